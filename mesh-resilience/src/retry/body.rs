//! [`ReplayBody`]: a request body that is recorded while it is sent, so that a retry can send
//! it again, up to a cap in bytes.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

/// What the first try's body recorded.
#[derive(Debug, Default)]
struct Recording {
    frames: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    len: usize,
    cap: usize,
    overflowed: bool,
    ended: bool,
}

/// The recording a retry replays from (nothing to record for a body that was empty).
#[derive(Debug, Clone)]
pub struct Replay(Option<Arc<Mutex<Recording>>>);

impl Replay {
    /// Whether the body can be sent again: it ended within the cap.
    pub fn is_replayable(&self) -> bool {
        self.0.as_ref().is_none_or(|r| {
            let r = r.lock().unwrap_or_else(|p| p.into_inner());
            r.ended && !r.overflowed
        })
    }

    /// A body sending the recording again (`None` when it is not replayable).
    pub fn body<B>(&self) -> Option<ReplayBody<B>> {
        let Some(recording) = &self.0 else {
            return Some(ReplayBody { state: State::Replay { frames: VecDeque::new(), trailers: None } });
        };
        let r = recording.lock().unwrap_or_else(|p| p.into_inner());
        (r.ended && !r.overflowed).then(|| ReplayBody {
            state: State::Replay { frames: r.frames.iter().cloned().collect(), trailers: r.trailers.clone() },
        })
    }
}

pin_project_lite::pin_project! {
    /// A request body for the first try, recorded as it is read (up to the cap), or one
    /// replaying that recording for a retry. See the [module docs](super).
    pub struct ReplayBody<B> {
        #[pin]
        state: State<B>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<B> {
        Empty { #[pin] inner: B },
        First { #[pin] inner: B, recording: Arc<Mutex<Recording>> },
        Replay { frames: VecDeque<Bytes>, trailers: Option<HeaderMap> },
    }
}

impl<B> std::fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.state {
            State::Empty { .. } => "ReplayBody::Empty",
            State::First { .. } => "ReplayBody::First",
            State::Replay { .. } => "ReplayBody::Replay",
        })
    }
}

impl<B: Body> ReplayBody<B> {
    /// Wraps the first try's body, recording up to `cap` bytes of it.
    pub fn new(inner: B, cap: usize) -> (Self, Replay) {
        if inner.is_end_stream() {
            // Nothing to record: a retry sends an empty body again.
            return (Self { state: State::Empty { inner } }, Replay(None));
        }
        let recording = Arc::new(Mutex::new(Recording { cap, ..Recording::default() }));
        (Self { state: State::First { inner, recording: recording.clone() } }, Replay(Some(recording)))
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().state.project() {
            StateProj::Empty { inner } => inner.poll_frame(cx),
            StateProj::First { mut inner, recording } => {
                let frame = ready!(inner.as_mut().poll_frame(cx));
                // A body may say it ended without a last `None` (hyper stops polling then).
                let ended = inner.is_end_stream();
                let mut r = recording.lock().unwrap_or_else(|p| p.into_inner());
                if ended && !matches!(frame, Some(Err(_))) {
                    r.ended = true;
                }
                match &frame {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            if !r.overflowed && r.len + data.len() <= r.cap {
                                r.len += data.len();
                                r.frames.push(data.clone());
                            } else {
                                r.overflowed = true;
                                r.frames.clear();
                            }
                        } else if let Some(trailers) = frame.trailers_ref() {
                            r.trailers = Some(trailers.clone());
                        }
                    }
                    Some(Err(_)) => r.overflowed = true,
                    None => r.ended = true,
                }
                Poll::Ready(frame)
            }
            StateProj::Replay { frames, trailers } => Poll::Ready(match frames.pop_front() {
                Some(data) => Some(Ok(Frame::data(data))),
                None => trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Empty { inner } | State::First { inner, .. } => inner.is_end_stream(),
            State::Replay { frames, trailers } => frames.is_empty() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Empty { inner } | State::First { inner, .. } => inner.size_hint(),
            State::Replay { frames, .. } => SizeHint::with_exact(frames.iter().map(|f| f.len() as u64).sum()),
        }
    }
}
