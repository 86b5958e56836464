//! Durability: the ledger of what each sensor has stored, the segment files and the
//! checkpoint on disk, the committer that makes appends durable, and recovery.

pub mod committer;
pub mod db;
pub mod files;
pub mod ledger;
pub mod recovery;
pub mod segments;
pub mod stats;
