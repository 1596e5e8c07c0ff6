//! The errors that travel through the request stack until the edge turns them into local
//! replies ([`crate::reply`]).

use std::error::Error as StdError;

/// Any error of the request path.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

pub(crate) const BODY_UNREADABLE: &str = "the request body could not be read";

/// The client's request body failed (malformed, or the client went away) while it was being
/// forwarded: the exchange is the client's failure, not the upstream's (400, `DPE`).
#[derive(Debug)]
pub(crate) struct ClientBodyError(pub(crate) BoxError);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{BODY_UNREADABLE}: {}", self.0)
    }
}

impl StdError for ClientBodyError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

/// A request the proxy does not forward: answered 400, with the flag `DPE`.
#[derive(Debug)]
pub(crate) struct BadRequest(pub(crate) &'static str);

impl std::fmt::Display for BadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl StdError for BadRequest {}

/// The route's destination has no cluster (an unknown subset): 503 `NC`.
#[derive(Debug, thiserror::Error)]
#[error("no cluster for {0}")]
pub(crate) struct NoCluster(pub(crate) String);

/// The destination has no endpoint to send to: 503 `UH`.
#[derive(Debug, thiserror::Error)]
#[error("no healthy upstream for {0}")]
pub(crate) struct NoHealthyUpstream(pub(crate) String);

/// Displays an error with its sources, `a: b: c`.
pub(crate) struct DisplayChain<'a>(pub(crate) &'a (dyn StdError + 'static));

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}
