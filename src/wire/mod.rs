//! The wire format, shared by both binaries and the store: how lines are framed, what a
//! reading line must hold, and the reply and record lines written in answer.

pub mod framing;
pub mod reading;
