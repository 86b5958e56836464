//! The archive: sealed segments shipped to S3 through the AWS CLI.

pub(super) mod aws_cli;
pub(super) mod shipper;
