//! The wire format, shared by both binaries and the store: how lines are framed, what a
//! reading line must hold, and the reply and record lines written in answer. The
//! contract itself is `docs/protocol.md`.

mod fast;
pub mod framing;
pub mod json;
pub mod reading;
pub mod record;
pub mod reply;
