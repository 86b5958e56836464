//! Durability: the ledger of what each sensor has stored, the segment files and the
//! checkpoint on disk, the committer that makes appends durable, and recovery.

pub(super) mod committer;
pub(super) mod db;
pub(super) mod files;
pub(super) mod ledger;
pub(super) mod recovery;
pub(super) mod replay;
pub(super) mod segments;
pub(super) mod stats;
pub(super) mod verify;
pub(super) mod watermarks;
