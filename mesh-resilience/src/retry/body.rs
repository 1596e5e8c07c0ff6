//! [`ReplayBody`]: a request body that is recorded while it is sent, so that a retry can send
//! it again, up to a cap in bytes.
//!
//! A body the first try never started to read (its connection failed before the request
//! went out) is handed back whole when that try drops it, so the retry sends the original,
//! whatever its length.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

/// What the first try's body recorded.
#[derive(Debug)]
struct Recording<B> {
    frames: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    len: usize,
    cap: usize,
    overflowed: bool,
    ended: bool,
    /// Whether a frame (or the end) was read.
    read: bool,
    /// The body itself, when the try that had it dropped it before reading a frame.
    unread: Option<B>,
}

fn lock<B>(recording: &Mutex<Recording<B>>) -> MutexGuard<'_, Recording<B>> {
    recording.lock().unwrap_or_else(|p| p.into_inner())
}

/// The recording a retry replays from (nothing to record for a body that was empty).
#[derive(Debug)]
pub struct Replay<B>(Option<Arc<Mutex<Recording<B>>>>);

impl<B> Clone for Replay<B> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<B> Replay<B> {
    /// Whether the body can be sent again: it ended within the cap, or it was never read.
    pub fn is_replayable(&self) -> bool {
        self.0.as_ref().is_none_or(|r| {
            let r = lock(r);
            r.unread.is_some() || r.ended && !r.overflowed
        })
    }

    /// A body sending the recording again, or the unread original (`None` when it is not
    /// replayable).
    pub fn body(&self) -> Option<ReplayBody<B>> {
        let Some(recording) = &self.0 else {
            return Some(ReplayBody { state: State::Replay { frames: VecDeque::new(), trailers: None } });
        };
        let mut r = lock(recording);
        if let Some(inner) = r.unread.take() {
            return Some(ReplayBody { state: State::First { inner: Some(inner), recording: recording.clone() } });
        }
        (r.ended && !r.overflowed).then(|| ReplayBody {
            state: State::Replay { frames: r.frames.iter().cloned().collect(), trailers: r.trailers.clone() },
        })
    }
}

/// A request body for the first try, recorded as it is read (up to the cap), or one
/// replaying that recording for a retry. See the [module docs](super).
pub struct ReplayBody<B> {
    state: State<B>,
}

enum State<B> {
    Empty {
        inner: B,
    },
    /// `inner` is `None` once it went back to the recording, unread.
    First {
        inner: Option<B>,
        recording: Arc<Mutex<Recording<B>>>,
    },
    Replay {
        frames: VecDeque<Bytes>,
        trailers: Option<HeaderMap>,
    },
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
    pub fn new(inner: B, cap: usize) -> (Self, Replay<B>) {
        if inner.is_end_stream() {
            // Nothing to record: a retry sends an empty body again.
            return (Self { state: State::Empty { inner } }, Replay(None));
        }
        let recording = Arc::new(Mutex::new(Recording {
            frames: Vec::new(),
            trailers: None,
            len: 0,
            cap,
            overflowed: false,
            ended: false,
            read: false,
            unread: None,
        }));
        (Self { state: State::First { inner: Some(inner), recording: recording.clone() } }, Replay(Some(recording)))
    }
}

impl<B> Drop for ReplayBody<B> {
    fn drop(&mut self) {
        if let State::First { inner, recording } = &mut self.state {
            let mut r = lock(recording);
            // Never read: the next try can send the original.
            if !r.read {
                r.unread = inner.take();
            }
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match &mut self.get_mut().state {
            State::Empty { inner } => Pin::new(inner).poll_frame(cx),
            State::First { inner: None, .. } => Poll::Ready(None),
            State::First { inner: Some(inner), recording } => {
                let frame = ready!(Pin::new(&mut *inner).poll_frame(cx));
                // A body may say it ended without a last `None` (hyper stops polling then).
                let ended = inner.is_end_stream();
                let mut r = lock(recording);
                r.read = true;
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
            State::Replay { frames, trailers } => Poll::Ready(match frames.pop_front() {
                Some(data) => Some(Ok(Frame::data(data))),
                None => trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Empty { inner } | State::First { inner: Some(inner), .. } => inner.is_end_stream(),
            State::First { inner: None, .. } => true,
            State::Replay { frames, trailers } => frames.is_empty() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Empty { inner } | State::First { inner: Some(inner), .. } => inner.size_hint(),
            State::First { inner: None, .. } => SizeHint::with_exact(0),
            State::Replay { frames, .. } => SizeHint::with_exact(frames.iter().map(|f| f.len() as u64).sum()),
        }
    }
}
