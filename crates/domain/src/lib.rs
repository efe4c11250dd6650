#![doc = include_str!("../README.md")]

pub mod address;
pub mod job;
pub mod message;
pub mod outcome;
pub mod retry;

pub use address::{EmailAddress, Mailbox};
pub use job::{Attachment, InvalidJob, Job};
pub use message::OutgoingMessage;
pub use outcome::{
    ErrorCode, IntegrationEvent, JobError, JobResult, NeedsReauthEvent, ProviderKind, ResultStatus,
};
pub use retry::{Backoff, FailureClass, RetryPolicy};
