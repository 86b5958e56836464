//! The HTTP side port: `/healthz`, `/metrics`, `/sensors`.

pub mod metrics;
pub mod pages;
pub mod port;
