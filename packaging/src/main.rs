//! walvault-gen-docs OUT_DIR: the man pages (`OUT_DIR/man/*.1`, one per command and subcommand)
//! and shell completions (`OUT_DIR/completions/{bash,zsh,fish}/`) of archive-agent and
//! restore-agent, generated from the clap definitions the agents parse with, so they never
//! disagree with `--help`. `packaging/build-deb.sh` runs it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> anyhow::Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .context("usage: walvault-gen-docs OUT_DIR")?;
    for cmd in [
        walvault::cli::archive_agent::Cli::command(),
        walvault::cli::restore_agent::Cli::command(),
    ] {
        let name = cmd.get_name().to_string();
        let man = out.join("man");
        std::fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
        clap_mangen::generate_to(cmd.clone(), &man).with_context(|| format!("man pages of {name}"))?;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let dir = out.join("completions").join(shell.to_string());
            completions(&mut cmd.clone(), &name, shell, &dir)?;
        }
    }
    Ok(())
}

fn completions(cmd: &mut clap::Command, name: &str, shell: Shell, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_complete::generate_to(shell, cmd, name, dir)
        .with_context(|| format!("{shell} completions of {name}"))?;
    Ok(())
}
