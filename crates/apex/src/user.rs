//! `apex user create`: an administrator creates an account directly in the database.
//!
//! The database is chosen like `apex migrate` chooses it (the database keys of the layered
//! configuration, see `config`). The account is checked by the server's own registration
//! rules (`apex_server::auth::create_account`). The password never comes from a flag (it
//! would show in `ps`): it is read from `APEX_USER_PASSWORD`, else typed at a prompt
//! without echo (twice), else read as the first line of a piped standard input.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use anyhow::{bail, Context as _};
use apex_server::auth::{AuthError, PasswordHasher};

use crate::config::{DatabaseFlags, Resolved};

/// The variable holding the new account's password.
pub const PASSWORD_ENV: &str = "APEX_USER_PASSWORD";

#[derive(clap::Subcommand)]
pub enum UserCommand {
    /// Create an account in the database and print its user id.
    ///
    /// The database options are those of `apex migrate`. The password comes from
    /// APEX_USER_PASSWORD, else a prompt, else the first line of standard input; never from
    /// a flag. The rules are those of registration: a valid email, a password of 8 to 1024
    /// characters. No demo usage data is added.
    ///
    /// Example: APEX_USER_PASSWORD='a long password' apex user create --email ada@example.com
    ///          apex user create --email ada@example.com --name Ada --database-url postgres://apex@db/apex
    #[command(verbatim_doc_comment)]
    Create {
        /// The account's email (stored in lower case).
        #[arg(long)]
        email: String,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        database: DatabaseFlags,
    },
}

pub async fn run(command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Create {
            email,
            name,
            database,
        } => create(&email, name.as_deref(), &database).await,
    }
}

async fn create(email: &str, name: Option<&str>, database: &DatabaseFlags) -> anyhow::Result<()> {
    let settings = Resolved::database(database)?.database_settings();
    // Check the email before asking for a password, and the password before touching the
    // database: the rules are registration's.
    let placeholder = "x".repeat(8);
    apex_server::auth::validate_new_account(email, &placeholder, name).map_err(refusal)?;
    let password = read_password()?;
    apex_server::auth::validate_new_account(email, &password, name).map_err(refusal)?;
    let store = apex_server::open_store(&settings).await?;
    let user = apex_server::auth::create_account(
        store.as_ref(),
        &PasswordHasher::new(settings.password_hashing),
        email,
        &password,
        name,
    )
    .await
    .map_err(refusal)?;
    eprintln!("created the account {}", user.email);
    println!("{}", user.id);
    Ok(())
}

/// The message of a refused account; the wording of each case is stable (scripts match it).
fn refusal(err: AuthError) -> anyhow::Error {
    match err {
        AuthError::EmailTaken => anyhow::anyhow!("an account with this email already exists"),
        AuthError::Validation(message) => anyhow::anyhow!("{message}"),
        AuthError::Internal(inner) => inner.context("creating the account"),
        other => anyhow::anyhow!("{other}"),
    }
}

fn read_password() -> anyhow::Result<String> {
    if let Ok(password) = std::env::var(PASSWORD_ENV) {
        if !password.is_empty() {
            return Ok(password);
        }
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        let first = prompt_hidden("Password: ")?;
        let second = prompt_hidden("Password again: ")?;
        if first != second {
            bail!("the passwords do not match");
        }
        return Ok(first);
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']).to_string();
    if password.is_empty() {
        bail!(
            "no password: set {PASSWORD_ENV}, type it at the prompt, or pipe it on standard input"
        );
    }
    Ok(password)
}

/// Reads a line from the terminal with echo off.
#[cfg(unix)]
fn prompt_hidden(prompt: &str) -> anyhow::Result<String> {
    use std::os::fd::AsRawFd as _;
    let mut stderr = std::io::stderr();
    write!(stderr, "{prompt}")?;
    stderr.flush()?;
    let fd = std::io::stdin().as_raw_fd();
    // SAFETY: tcgetattr/tcsetattr on our own standard input with a zeroed, then filled,
    // termios; the original settings are restored before returning.
    let original = unsafe {
        let mut termios = std::mem::zeroed::<libc::termios>();
        if libc::tcgetattr(fd, &mut termios) != 0 {
            bail!("reading the terminal settings");
        }
        let original = termios;
        termios.c_lflag &= !libc::ECHO;
        termios.c_lflag |= libc::ECHONL;
        libc::tcsetattr(fd, libc::TCSANOW, &termios);
        original
    };
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    // SAFETY: as above.
    unsafe {
        libc::tcsetattr(fd, libc::TCSANOW, &original);
    }
    read.context("reading the password")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

#[cfg(not(unix))]
fn prompt_hidden(prompt: &str) -> anyhow::Result<String> {
    bail!("{prompt}cannot prompt here; set {PASSWORD_ENV}")
}
