//! The archive: sealed segments shipped to S3 through the AWS CLI.

pub mod aws_cli;
pub mod shipper;
