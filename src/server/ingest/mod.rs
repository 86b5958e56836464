//! The sensor port: one mio event loop over every connection, the worker pool that
//! decides their lines, and the completions that carry replies back to the loop.

pub(super) mod accept;
pub(super) mod completion;
pub(super) mod connection;
pub(super) mod event_loop;
pub(super) mod slots;
pub(super) mod tls;
pub(super) mod worker;
