//! The sensor port: one mio event loop over every connection, the worker pool that
//! decides their lines, and the completions that carry replies back to the loop.

pub mod accept;
pub mod completion;
pub mod connection;
pub mod event_loop;
pub mod worker;
