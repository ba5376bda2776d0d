//! `archive-agent push` as PostgreSQL runs it (archive_command): one WAL file archived, one log
//! line, and the exit code PostgreSQL reads (see [`crate::exit`]: never above 125).

use std::path::Path;
use std::time::Instant;

use crate::commands::push::PushOutcome;
use crate::config::RepoArgs;
use crate::exit;

/// Archive the file at `wal_path` and say how it went, as the exit code.
pub fn push(repo: &RepoArgs, wal_path: &Path, compress_level: Option<i32>) -> u8 {
    let started = Instant::now();
    let settings = match repo.settings(compress_level) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("push {}: {e}", wal_path.display());
            return exit::USAGE;
        }
    };
    let result = match crate::call::run_call(crate::commands::push::push(&settings, wal_path)) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("push {}: cannot start: {e}", wal_path.display());
            return exit::NOT_FOUND_OR_RETRY;
        }
    };
    let ms = started.elapsed().as_millis();
    match result {
        Ok(PushOutcome {
            name,
            size,
            stored_size,
            newly_stored,
            ..
        }) => {
            let what = if newly_stored {
                "archived"
            } else {
                "already archived, identical"
            };
            tracing::info!("push {name}: {what}, {size} bytes, stored {stored_size} bytes, {ms} ms");
            exit::SUCCESS
        }
        Err(e) => {
            tracing::error!("push {}: {e}", wal_path.display());
            e.exit_code()
        }
    }
}
