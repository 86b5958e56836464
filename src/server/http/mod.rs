//! The HTTP side port: `/healthz`, `/metrics`, `/sensors`.

pub(super) mod metrics;
pub(super) mod pages;
pub(super) mod port;
