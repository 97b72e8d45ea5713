//! The stable error codes every failure is reported with.
//!
//! A code is part of the interface: it appears in the DLQ, in execution summaries, in metric
//! labels, in CLI output and as a process exit status. Codes are never renumbered; new ones are
//! appended. Each code is either *transient* (worth retrying: the same call may succeed later) or
//! *permanent* (retrying cannot help: the request or the configuration is wrong).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Every failure the service reports, by stable code. See the table in `README.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// OB001: the observers file is invalid.
    #[serde(rename = "OB001")]
    ConfigInvalid,
    /// OB002: a template failed to render against an event (undefined field, bad filter).
    #[serde(rename = "OB002")]
    TemplateFailed,
    /// OB003: a secret named by `*_env` or `${VAR}` is not set.
    #[serde(rename = "OB003")]
    SecretMissing,
    /// OB004: an action attempt exceeded its timeout.
    #[serde(rename = "OB004")]
    ActionTimeout,
    /// OB005: the target could not be reached (DNS, refused, reset, TLS).
    #[serde(rename = "OB005")]
    ConnectionFailed,
    /// OB006: the target answered with a retryable status (5xx, 408).
    #[serde(rename = "OB006")]
    RemoteUnavailable,
    /// OB007: the target asked us to slow down (429).
    #[serde(rename = "OB007")]
    RateLimited,
    /// OB008: the target rejected the request (4xx other than 408/429).
    #[serde(rename = "OB008")]
    RemoteRejected,
    /// OB009: a change-log row could not be turned into an event.
    #[serde(rename = "OB009")]
    MalformedEvent,
    /// OB010: the service's own storage (Postgres, Redis) failed.
    #[serde(rename = "OB010")]
    StorageUnavailable,
    /// OB011: a fenced write lost its compare-and-swap (another node owns the partition now).
    #[serde(rename = "OB011")]
    FencedOut,
    /// OB012: work was abandoned because the node is shutting down.
    #[serde(rename = "OB012")]
    ShuttingDown,
    /// OB013: a defect in the service itself.
    #[serde(rename = "OB013")]
    Internal,
    /// OB014: another node is running the same action right now (deduplication); retried later.
    #[serde(rename = "OB014")]
    InProgressElsewhere,
    /// OB015: the target's circuit breaker is open; the call was not made.
    #[serde(rename = "OB015")]
    CircuitOpen,
    /// OB016: every slot of the target's concurrency limit stayed taken for the queue wait (or
    /// the target asked to wait longer); the call was not made.
    #[serde(rename = "OB016")]
    EndpointBusy,
    /// OB017: a target URL rendered from event data resolved to a loopback, private, link-local
    /// or otherwise non-public address; the call was not made (see `allow_private_targets`).
    #[serde(rename = "OB017")]
    TargetRefused,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::ConfigInvalid,
        ErrorCode::TemplateFailed,
        ErrorCode::SecretMissing,
        ErrorCode::ActionTimeout,
        ErrorCode::ConnectionFailed,
        ErrorCode::RemoteUnavailable,
        ErrorCode::RateLimited,
        ErrorCode::RemoteRejected,
        ErrorCode::MalformedEvent,
        ErrorCode::StorageUnavailable,
        ErrorCode::FencedOut,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
        ErrorCode::InProgressElsewhere,
        ErrorCode::CircuitOpen,
        ErrorCode::EndpointBusy,
        ErrorCode::TargetRefused,
    ];

    /// The stable code, `OB001` … `OB017`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ConfigInvalid => "OB001",
            ErrorCode::TemplateFailed => "OB002",
            ErrorCode::SecretMissing => "OB003",
            ErrorCode::ActionTimeout => "OB004",
            ErrorCode::ConnectionFailed => "OB005",
            ErrorCode::RemoteUnavailable => "OB006",
            ErrorCode::RateLimited => "OB007",
            ErrorCode::RemoteRejected => "OB008",
            ErrorCode::MalformedEvent => "OB009",
            ErrorCode::StorageUnavailable => "OB010",
            ErrorCode::FencedOut => "OB011",
            ErrorCode::ShuttingDown => "OB012",
            ErrorCode::Internal => "OB013",
            ErrorCode::InProgressElsewhere => "OB014",
            ErrorCode::CircuitOpen => "OB015",
            ErrorCode::EndpointBusy => "OB016",
            ErrorCode::TargetRefused => "OB017",
        }
    }

    /// Whether retrying the same operation later can succeed.
    #[must_use]
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorCode::ActionTimeout
                | ErrorCode::ConnectionFailed
                | ErrorCode::RemoteUnavailable
                | ErrorCode::RateLimited
                | ErrorCode::StorageUnavailable
                | ErrorCode::ShuttingDown
                | ErrorCode::InProgressElsewhere
                | ErrorCode::CircuitOpen
                | ErrorCode::EndpointBusy
        )
    }

    /// Whether the failure means the call was refused before it was made (open circuit, busy
    /// endpoint): no attempt is spent, and the work waits in the job queue instead.
    #[must_use]
    pub fn call_not_made(self) -> bool {
        matches!(self, ErrorCode::CircuitOpen | ErrorCode::EndpointBusy)
    }

    /// One line on what the code means, for `--help` output and docs.
    #[must_use]
    pub fn description(self) -> &'static str {
        match self {
            ErrorCode::ConfigInvalid => "the observers file is invalid",
            ErrorCode::TemplateFailed => "a template failed to render against the event",
            ErrorCode::SecretMissing => "a secret's environment variable is not set",
            ErrorCode::ActionTimeout => "an action attempt timed out",
            ErrorCode::ConnectionFailed => "the target could not be reached",
            ErrorCode::RemoteUnavailable => "the target answered 5xx or 408",
            ErrorCode::RateLimited => "the target answered 429",
            ErrorCode::RemoteRejected => "the target rejected the request (4xx)",
            ErrorCode::MalformedEvent => "a change-log row could not be turned into an event",
            ErrorCode::StorageUnavailable => "the service's own storage failed",
            ErrorCode::FencedOut => "another node holds the partition now",
            ErrorCode::ShuttingDown => "the node is shutting down",
            ErrorCode::Internal => "a defect in the service",
            ErrorCode::InProgressElsewhere => "another node is running the same action right now",
            ErrorCode::CircuitOpen => "the target's circuit breaker is open; not called",
            ErrorCode::EndpointBusy => {
                "no slot of the target's concurrency limit within the queue wait; not called"
            }
            ErrorCode::TargetRefused => {
                "a URL from event data reached a private or loopback address; not called"
            }
        }
    }

    /// The process exit status a CLI command ends with when it fails with this code.
    #[must_use]
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorCode::ConfigInvalid | ErrorCode::TemplateFailed | ErrorCode::SecretMissing => 2,
            ErrorCode::StorageUnavailable => 3,
            ErrorCode::FencedOut => 4,
            ErrorCode::ShuttingDown => 5,
            _ => 1,
        }
    }

    /// Classifies an HTTP status answered by a target: `None` when the request was accepted
    /// (2xx). Anything else that is not an error status (1xx, 3xx) is a permanent failure:
    /// redirects are not followed, so nothing reached a receiver, and asking again gets the same
    /// answer.
    #[must_use]
    pub fn from_http_status(status: u16) -> Option<ErrorCode> {
        match status {
            200..=299 => None,
            408 => Some(ErrorCode::RemoteUnavailable),
            429 => Some(ErrorCode::RateLimited),
            100..=499 => Some(ErrorCode::RemoteRejected),
            _ => Some(ErrorCode::RemoteUnavailable),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_numbered_in_order() {
        for (index, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.as_str(), format!("OB{:03}", index + 1));
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }

    #[test]
    fn http_statuses_are_classified() {
        assert_eq!(ErrorCode::from_http_status(200), None);
        assert_eq!(ErrorCode::from_http_status(204), None);
        for not_delivered in [101, 301, 302, 304, 307, 308] {
            assert_eq!(
                ErrorCode::from_http_status(not_delivered),
                Some(ErrorCode::RemoteRejected),
                "{not_delivered}"
            );
        }
        for transient in [500, 502, 503, 504, 408, 429] {
            assert!(
                ErrorCode::from_http_status(transient)
                    .unwrap()
                    .is_transient(),
                "{transient}"
            );
        }
        for permanent in [400, 401, 403, 404, 409, 410, 422] {
            assert!(
                !ErrorCode::from_http_status(permanent)
                    .unwrap()
                    .is_transient(),
                "{permanent}"
            );
        }
        assert_eq!(
            ErrorCode::from_http_status(429),
            Some(ErrorCode::RateLimited)
        );
    }

    #[test]
    fn configuration_problems_are_permanent() {
        for code in [
            ErrorCode::ConfigInvalid,
            ErrorCode::TemplateFailed,
            ErrorCode::SecretMissing,
        ] {
            assert!(!code.is_transient());
            assert_eq!(code.exit_code(), 2);
        }
    }
}
