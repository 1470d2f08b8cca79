//! Named exit codes, in the spirit of sysexits(3), and the one place that maps an error to one.
//!
//! Commands return `anyhow::Result`; [`code_for`] walks the error chain and picks the code of the
//! first error type it knows, so a configuration problem always ends in 78 wherever it surfaced.

use crate::config::ConfigError;
use crate::postgres::PostgresError;

/// Everything went well.
pub const OK: u8 = 0;
/// A failure with no more specific code.
pub const FAILURE: u8 = 1;
/// The volume holds data regobox refuses to touch (foreign content, another major version), or
/// an archive is refused (damaged, too new, would replace data without --force).
pub const DATA: u8 = 65;
/// Something regobox needs is missing from the system (PostgreSQL binaries, an OS tool).
pub const UNAVAILABLE: u8 = 69;
/// Another regobox holds what the command needs (the data directory, a restore in progress):
/// try again once it is done (sysexits' EX_TEMPFAIL).
pub const TEMPFAIL: u8 = 75;
/// The configuration is invalid (sysexits' EX_CONFIG).
pub const CONFIG: u8 = 78;

/// The exit code for an error that ended a command.
pub fn code_for(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if cause.downcast_ref::<ConfigError>().is_some() {
            return CONFIG;
        }
        if let Some(pg) = cause.downcast_ref::<PostgresError>() {
            return pg.exit_code();
        }
        if cause
            .downcast_ref::<crate::backup::RestoreInProgress>()
            .is_some()
            || cause
                .downcast_ref::<crate::supervisor::control::HeldElsewhere>()
                .is_some()
        {
            return TEMPFAIL;
        }
        if let Some(crate::backup::archive::ArchiveError::Write(_)) = cause.downcast_ref() {
            return FAILURE;
        }
        if cause
            .downcast_ref::<crate::backup::RestoreRefused>()
            .is_some()
            || cause
                .downcast_ref::<crate::backup::archive::ArchiveError>()
                .is_some()
        {
            return DATA;
        }
    }
    FAILURE
}
