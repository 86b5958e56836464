//! The archive: sealed segments shipped to S3 through the AWS CLI.

pub(super) mod aws_cli;
pub(super) mod bucket;
pub(super) mod confirmed;
pub(super) mod error;
pub(super) mod fetcher;
pub(super) mod shipper;
