//! Reusing SSH connections to builders: one persistent OpenSSH master connection per
//! builder, which the stock build-remote's `ssh` joins, so that a build does not pay a new
//! TCP connection, key exchange and login while its slot sits idle.
//!
//! The hook starts each master itself, never build-remote's `ssh`: a master that
//! build-remote's `ssh` left behind (`ControlMaster=auto` with `ControlPersist`) would keep
//! the daemon's fds 2 and 4, which build-remote's `ssh` inherits, open after the build, and
//! the daemon waits for EOF on both before it reaps the hook. A master here is started with
//! its stdio on `/dev/null` (stderr on the hook's log file while it connects), in a process
//! group of its own (Nix kills the hook's group when a build ends), and OpenSSH closes every
//! other inherited fd at start (fds 4 and 5 included) and detaches into its own session once
//! it is logged in (`ControlPersist`).
//!
//! A master checks the pinned host key as strictly as Nix does, and more: a known-hosts file
//! that holds only the pinned key, `StrictHostKeyChecking=yes`, no global known-hosts file,
//! `BatchMode=yes`. Its control socket is named by a hash of everything that decides where
//! it connects, as whom and which key it accepts (store URI, identity file, pinned key,
//! `NIX_SSHOPTS`), so a build pinned to another key never joins an old master. The sockets
//! live in a directory only the hook's user can enter (0700, owned by it).
//!
//! build-remote's `ssh` joins through `NIX_SSHOPTS` (read by every Nix from 2.8 on):
//! `-o ControlPath=<socket> -o ControlMaster=no`, given only while the master answers on
//! its socket. `ControlMaster=no` means a client that finds no master, or a dead one, or
//! whose session the builder refuses on the shared connection (sshd's `MaxSessions`),
//! connects directly instead of failing; and a build that still could not start through a
//! master is tried once more without it (see `run`), so a shared connection never fails a
//! build.
//!
//! Split like the rest of the hook: the names, arguments and file contents are pure
//! functions; [`Masters`] does the I/O.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::config::HookConfig;
use super::machine::Grant;

/// The longest control directory. A Unix socket path holds at most 104 bytes on the BSDs
/// and macOS (108 on Linux); a socket's path is the directory, `/`, a 20-character name and,
/// while OpenSSH creates it, a 17-character temporary suffix.
pub(crate) const MAX_CONTROL_DIR: usize = 64;

/// How long a master may take to connect and log in before the hook gives up on it.
const MASTER_CONNECT_BOUND: Duration = Duration::from_secs(20);

/// Checks a configured control directory: absolute, short enough for socket paths, and
/// free of what `NIX_SSHOPTS` (split on whitespace by Nix 2.8, like a shell by newer Nix)
/// or OpenSSH's `ControlPath` (`%` tokens) would read differently.
pub(crate) fn check_control_dir(dir: &Path) -> Result<(), &'static str> {
    let Some(text) = dir.to_str() else {
        return Err("must be valid UTF-8");
    };
    if !dir.is_absolute() {
        return Err("must be an absolute path");
    }
    if text.len() > MAX_CONTROL_DIR {
        return Err("must be at most 64 bytes (Unix socket paths are short)");
    }
    if text
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '%' | '"' | '\'' | '\\'))
    {
        return Err("cannot contain whitespace, quotes, `\\` or `%`");
    }
    Ok(())
}

/// Where a store URI's `ssh` connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Destination {
    /// What Nix passes to `ssh`: `user@host` or `host`.
    pub(crate) target: String,
    /// The host alone, as Nix writes it into the pinned known-hosts file.
    pub(crate) host: String,
    /// A port in the URI (newer Nix passes it as `-p`).
    pub(crate) port: Option<u16>,
}

/// The destination of an `ssh://` or `ssh-ng://` store URI (split by
/// [`crate::validate::ssh_address`]); `None` for anything else, and for a host or user that
/// `ssh` would misread (a leading `-`, an empty user).
pub(crate) fn destination(store_uri: &str) -> Option<Destination> {
    let a = crate::validate::ssh_address(store_uri).ok()?;
    if a.host.starts_with('-') || a.user.as_deref().is_some_and(str::is_empty) {
        return None;
    }
    let target = match &a.user {
        Some(u) => format!("{u}@{}", a.host),
        None => a.host.clone(),
    };
    Some(Destination {
        target,
        host: a.host,
        port: a.port,
    })
}

/// The name of a builder's master socket: 20 hex digits of SHA-256 over everything that
/// decides where it connects, as whom, and which host key it accepts.
pub(crate) fn master_name(
    store_uri: &str,
    identity: Option<&str>,
    host_key_base64: &str,
    sshopts: &str,
) -> String {
    let mut input = Vec::new();
    for part in [store_uri, identity.unwrap_or(""), host_key_base64, sshopts] {
        // Length-prefixed, so that no two different tuples hash the same bytes.
        input.extend_from_slice(&(part.len() as u64).to_le_bytes());
        input.extend_from_slice(part.as_bytes());
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    digest.as_ref()[..10]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `NIX_SSHOPTS` as words, the way Nix 2.8 splits it (on whitespace); `None` when it holds
/// quotes or backslashes, which newer Nix splits like a shell: the hook would not know
/// which words the child's `ssh` gets, so it does not reuse connections.
pub(crate) fn split_sshopts(value: &str) -> Option<Vec<String>> {
    if value.contains(['"', '\'', '\\']) {
        return None;
    }
    Some(value.split_whitespace().map(str::to_owned).collect())
}

/// The known-hosts file of a master: the pinned key only, under the host name as Nix writes
/// it (an ssh_config `HostKeyAlias` must match it, as for Nix), and under `[host]:port` when
/// the URI has a port.
pub(crate) fn known_hosts(dest: &Destination, key_line: &str) -> String {
    let key = key_line.trim();
    let mut text = format!("{} {key}\n", dest.host);
    if let Some(port) = dest.port {
        text.push_str(&format!("[{}]:{port} {key}\n", dest.host));
    }
    text
}

/// The arguments of `ssh` that starts a master. OpenSSH takes the first value it gets for
/// an option, so the hook's own come first and `NIX_SSHOPTS` cannot weaken them; the
/// identity comes after `NIX_SSHOPTS`, as in Nix.
pub(crate) fn master_args(
    dest: &Destination,
    control_path: &Path,
    known_hosts_file: &Path,
    identity: Option<&str>,
    persist_secs: u64,
    sshopts: &[String],
) -> Vec<String> {
    let mut args: Vec<String> = ["-M", "-N", "-x", "-a"].map(str::to_owned).into();
    for option in [
        format!("ControlPath={}", control_path.display()),
        format!("ControlPersist={persist_secs}"),
        "BatchMode=yes".to_owned(),
        "StrictHostKeyChecking=yes".to_owned(),
        format!("UserKnownHostsFile={}", known_hosts_file.display()),
        "GlobalKnownHostsFile=/dev/null".to_owned(),
        "UpdateHostKeys=no".to_owned(),
        "ClearAllForwardings=yes".to_owned(),
        // A builder that went away (rebooted, unplugged) ends its master within ~15 s.
        "ServerAliveInterval=5".to_owned(),
        "ServerAliveCountMax=3".to_owned(),
        "ConnectTimeout=15".to_owned(),
    ] {
        args.push("-o".to_owned());
        args.push(option);
    }
    if let Some(port) = dest.port {
        args.push("-p".to_owned());
        args.push(port.to_string());
    }
    args.extend(sshopts.iter().cloned());
    if let Some(identity) = identity {
        args.push("-i".to_owned());
        args.push(identity.to_owned());
    }
    args.push(dest.target.clone());
    args
}

/// `NIX_SSHOPTS` for a build-remote that joins the master at `control_path`: ours first
/// (OpenSSH takes the first value of an option), then the daemon's own.
pub(crate) fn child_sshopts(control_path: &Path, existing: &str) -> String {
    let mut v = format!(
        "-o ControlPath={} -o ControlMaster=no",
        control_path.display()
    );
    if !existing.trim().is_empty() {
        v.push(' ');
        v.push_str(existing.trim());
    }
    v
}

/// The default control directories, best first.
fn default_dirs(uid: u32) -> Vec<PathBuf> {
    vec![
        PathBuf::from(format!("/run/nixdispatch-hook-{uid}")),
        std::env::temp_dir().join(format!("nixdispatch-hook-{uid}")),
    ]
}

/// Creates `dir` (0700) unless it exists, and checks that only `uid` can reach into it: a
/// directory (not a link) owned by `uid` with no permission for group or others.
fn ensure_private_dir(dir: &Path, uid: u32) -> Result<(), String> {
    check_control_dir(dir).map_err(str::to_owned)?;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => return Err(format!("cannot create it: {e}")),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.is_dir() {
        return Err("is not a directory".to_owned());
    }
    if meta.uid() != uid {
        return Err(format!("is owned by uid {}, not {uid}", meta.uid()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "is open to others (mode {:o}); it must be 0700",
            meta.mode() & 0o777
        ));
    }
    Ok(())
}

/// Whether the time stamped in `stamp` (its modification time) is at least `every` before
/// `now`, or there is none; if so, stamps `now` (so that the next caller waits again).
/// Several hooks may race here: at worst two connect ahead, which the masters' locks make
/// harmless.
fn stamp_due(stamp: &Path, every: Duration, now: std::time::SystemTime) -> bool {
    let last = std::fs::metadata(stamp).and_then(|m| m.modified()).ok();
    if let Some(last) = last
        && now.duration_since(last).is_ok_and(|age| age < every)
    {
        return false;
    }
    let touched = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(stamp)
        .and_then(|f| f.set_modified(now));
    touched.is_ok()
}

/// The masters of one hook process.
#[derive(Debug)]
pub(crate) struct Masters {
    dir: PathBuf,
    persist_secs: u64,
    /// The daemon's `NIX_SSHOPTS`, as given and as words.
    sshopts: String,
    sshopts_words: Vec<String>,
    /// Where a master's messages go while it connects (the hook's log file).
    log_file: Option<PathBuf>,
    /// Masters this hook started that were not up yet, each with the flag that tells its
    /// watcher to stop it (see its `Drop`).
    starting: Mutex<Vec<(JoinHandle<()>, Arc<AtomicBool>)>>,
}

impl Drop for Masters {
    /// The hook is ending: a master still connecting is stopped (the next build starts
    /// another), so that no master outlives the lock that keeps a second one off its
    /// socket. One already up is not touched; it lives on in its own session.
    fn drop(&mut self) {
        let starting = std::mem::take(self.starting.get_mut().unwrap_or_else(|e| e.into_inner()));
        for (thread, abandon) in starting {
            abandon.store(true, Ordering::SeqCst);
            let _ = thread.join();
        }
    }
}

impl Masters {
    /// The masters as configured; `None` (logged) when reuse is off or cannot work here.
    pub(crate) fn new(config: &HookConfig) -> Option<Masters> {
        let reuse = &config.ssh_reuse;
        if !reuse.enabled {
            return None;
        }
        let sshopts = std::env::var("NIX_SSHOPTS").unwrap_or_default();
        let Some(sshopts_words) = split_sshopts(&sshopts) else {
            tracing::warn!(
                %sshopts,
                "NIX_SSHOPTS has quotes or backslashes: not reusing SSH connections"
            );
            return None;
        };
        let uid = rustix::process::geteuid().as_raw();
        let candidates = match &reuse.control_dir {
            Some(dir) => vec![dir.clone()],
            None => default_dirs(uid),
        };
        let mut problems = Vec::new();
        let dir = candidates
            .into_iter()
            .find(|dir| match ensure_private_dir(dir, uid) {
                Ok(()) => true,
                Err(e) => {
                    problems.push(format!("{}: {e}", dir.display()));
                    false
                }
            });
        let Some(dir) = dir else {
            tracing::warn!(
                ?problems,
                "no private control directory: not reusing SSH connections"
            );
            return None;
        };
        Some(Masters {
            dir,
            persist_secs: reuse.persist_secs,
            sshopts,
            sshopts_words,
            log_file: config.log_file.clone(),
            starting: Mutex::default(),
        })
    }

    /// Whether this hook should connect ahead now: at most once per half the persist time
    /// (30 s at most) on this machine, whichever hook asks first (`ahead.stamp` in the
    /// control directory). Connecting ahead asks the scheduler for every builder
    /// (`ListBuilders` reads the whole fleet), so a mass rebuild's thousand waiting builds
    /// must not each ask; and masters started ahead stay up for the persist time anyway.
    pub(crate) fn connect_ahead_due(&self) -> bool {
        let every = Duration::from_secs((self.persist_secs / 2).clamp(1, 30));
        stamp_due(
            &self.dir.join("ahead.stamp"),
            every,
            std::time::SystemTime::now(),
        )
    }

    /// For one attempt on `grant`'s host: the `NIX_SSHOPTS` that joins its master when one
    /// answers, else `None` (the child then connects directly) after starting a master in
    /// the background for the builds that follow.
    pub(crate) fn prepare(&self, grant: &Grant, identity: Option<&str>) -> Option<String> {
        let opts = self.ensure(
            &grant.host_id,
            &grant.store_uri,
            &grant.host_public_key_base64,
            identity,
        );
        if opts.is_some() {
            tracing::info!(host = %grant.host_id, "joining the SSH master");
        }
        opts
    }

    /// The `NIX_SSHOPTS` that joins the master of the builder at `store_uri` pinned to
    /// `host_key_base64` when it answers; otherwise starts it in the background and gives
    /// `None`. Never blocks on the network.
    pub(crate) fn ensure(
        &self,
        host_id: &str,
        store_uri: &str,
        host_key_base64: &str,
        identity: Option<&str>,
    ) -> Option<String> {
        let dest = destination(store_uri)?;
        let name = master_name(store_uri, identity, host_key_base64, &self.sshopts);
        let socket = self.dir.join(&name);
        if UnixStream::connect(&socket).is_ok() {
            return Some(child_sshopts(&socket, &self.sshopts));
        }
        if let Err(e) = self.start(&dest, &name, host_id, host_key_base64, identity) {
            tracing::warn!(host = %host_id, error = %e, "cannot start an SSH master");
        }
        None
    }

    /// Starts the master `name` for `dest` unless another hook is starting it. The lock
    /// (`<name>.lock`, held until the master is up or failed) keeps two hooks from starting
    /// two masters on one socket: the second would find the socket taken and stay a plain
    /// connection until the builder drops it.
    fn start(
        &self,
        dest: &Destination,
        name: &str,
        host_id: &str,
        host_key_base64: &str,
        identity: Option<&str>,
    ) -> Result<(), String> {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.dir.join(format!("{name}.lock")))
            .map_err(|e| format!("cannot open its lock: {e}"))?;
        if lock.try_lock().is_err() {
            tracing::debug!(host = %host_id, "another hook is starting the SSH master");
            return Ok(());
        }
        let socket = self.dir.join(name);
        if UnixStream::connect(&socket).is_ok() {
            return Ok(());
        }
        // A socket nobody answers on is left by a master that died: clear it for the new one.
        match std::fs::remove_file(&socket) {
            Ok(()) => tracing::info!(socket = %socket.display(), "removed a dead master's socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove the old socket: {e}")),
        }
        let key = base64::engine::general_purpose::STANDARD
            .decode(host_key_base64)
            .ok()
            .and_then(|k| String::from_utf8(k).ok())
            .ok_or("the pinned host key is not base64 of a key line")?;
        let known = self.dir.join(format!("{name}.known_hosts"));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&known)
            .map_err(|e| format!("cannot write {}: {e}", known.display()))?;
        f.write_all(known_hosts(dest, &key).as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", known.display()))?;
        drop(f);
        let args = master_args(
            dest,
            &socket,
            &known,
            identity,
            self.persist_secs,
            &self.sshopts_words,
        );
        let stderr = self
            .log_file
            .as_ref()
            .and_then(|p| std::fs::OpenOptions::new().append(true).open(p).ok())
            .map_or_else(Stdio::null, Stdio::from);
        let mut child = Command::new("ssh")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Out of the hook's process group, which Nix kills when the build ends.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot run ssh: {e}"))?;
        tracing::info!(host = %host_id, pid = child.id(), socket = %socket.display(), "starting an SSH master");
        let host = host_id.to_owned();
        let abandon = Arc::new(AtomicBool::new(false));
        let stop = abandon.clone();
        // With `ControlPersist`, the `ssh` started here exits once the master it forked is
        // logged in (0) or when it failed: wait for that off the hook's own work, holding
        // the lock, bounded, and stop it if the hook ends first.
        let span = tracing::Span::current();
        let thread = std::thread::spawn(move || {
            let _span = span.entered();
            let _lock: File = lock;
            let started = Instant::now();
            loop {
                match child.try_wait() {
                    Ok(None) if stop.load(Ordering::SeqCst) => {
                        tracing::info!(%host, "the hook ends before its SSH master is up; stopping it");
                        let _ = child.kill();
                        let _ = child.wait();
                        return;
                    }
                    Ok(Some(status)) if status.success() => {
                        tracing::info!(%host, millis = started.elapsed().as_millis(), "SSH master up");
                        return;
                    }
                    Ok(Some(status)) => {
                        tracing::warn!(%host, %status, "the SSH master failed (its messages are above)");
                        return;
                    }
                    Ok(None) if started.elapsed() > MASTER_CONNECT_BOUND => {
                        tracing::warn!(%host, "the SSH master did not connect in time; stopping it");
                        let _ = child.kill();
                        let _ = child.wait();
                        return;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                    Err(e) => {
                        tracing::warn!(%host, error = %e, "cannot wait for the SSH master");
                        return;
                    }
                }
            }
        });
        let mut starting = self.starting.lock().unwrap_or_else(|e| e.into_inner());
        starting.retain(|(t, _)| !t.is_finished());
        starting.push((thread, abandon));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Store URIs give the `ssh` destination Nix would use, ports and users included.
    #[test]
    fn destinations() {
        let d = destination("ssh-ng://builder1").unwrap();
        assert_eq!(
            (d.target.as_str(), d.host.as_str(), d.port),
            ("builder1", "builder1", None)
        );
        let d = destination("ssh://nix@b.example.org?compress=true").unwrap();
        assert_eq!(
            (d.target.as_str(), d.host.as_str(), d.port),
            ("nix@b.example.org", "b.example.org", None)
        );
        let d = destination("ssh-ng://root@b:2222").unwrap();
        assert_eq!((d.target.as_str(), d.port), ("root@b", Some(2222)));
        let d = destination("ssh-ng://[2001:db8::1]:22").unwrap();
        assert_eq!((d.host.as_str(), d.port), ("2001:db8::1", Some(22)));
        let d = destination("ssh-ng://2001:db8::1").unwrap();
        assert_eq!((d.host.as_str(), d.port), ("2001:db8::1", None));
        for bad in [
            "file:///nix",
            "ssh-ng://",
            "ssh://-oProxyCommand=x",
            "ssh://@h",
            "ssh://h:x",
        ] {
            assert_eq!(destination(bad), None, "{bad}");
        }
    }

    /// A master's name changes with anything that decides where it connects, as whom or
    /// which key it trusts, so a changed pinned key never joins an old master.
    #[test]
    fn master_names_key_on_uri_identity_key_and_options() {
        let base = master_name("ssh-ng://b1", Some("/k"), "S0VZ", "-F /c");
        assert_eq!(base.len(), 20);
        assert!(base.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            base,
            master_name("ssh-ng://b1", Some("/k"), "S0VZ", "-F /c")
        );
        for other in [
            master_name("ssh://b1", Some("/k"), "S0VZ", "-F /c"),
            master_name("ssh-ng://b1", Some("/k2"), "S0VZ", "-F /c"),
            master_name("ssh-ng://b1", None, "S0VZ", "-F /c"),
            master_name("ssh-ng://b1", Some("/k"), "T1RIRVI=", "-F /c"),
            master_name("ssh-ng://b1", Some("/k"), "S0VZ", ""),
            // Lengths are part of the input: moving a byte between fields changes the name.
            master_name("ssh-ng://b1/", Some("k"), "S0VZ", "-F /c"),
        ] {
            assert_ne!(base, other);
        }
    }

    /// The master trusts the pinned key only, and the hook's options come before
    /// `NIX_SSHOPTS` (OpenSSH keeps the first value), the identity after it.
    #[test]
    fn master_arguments_pin_the_key_first() {
        let d = destination("ssh-ng://root@b1:2222").unwrap();
        let opts = vec![
            "-F".to_owned(),
            "/cfg".to_owned(),
            "-o".to_owned(),
            "StrictHostKeyChecking=no".to_owned(),
        ];
        let a = master_args(
            &d,
            Path::new("/run/x/abc"),
            Path::new("/run/x/abc.known_hosts"),
            Some("/id"),
            60,
            &opts,
        );
        let pos = |w: &str| {
            a.iter()
                .position(|x| x == w)
                .unwrap_or_else(|| panic!("{w}: {a:?}"))
        };
        assert!(pos("StrictHostKeyChecking=yes") < pos("StrictHostKeyChecking=no"));
        assert!(pos("UserKnownHostsFile=/run/x/abc.known_hosts") < pos("-F"));
        assert!(a.contains(&"GlobalKnownHostsFile=/dev/null".to_owned()));
        assert!(a.contains(&"BatchMode=yes".to_owned()));
        assert!(a.contains(&"ControlPersist=60".to_owned()));
        assert!(a.contains(&"ControlPath=/run/x/abc".to_owned()));
        assert_eq!(&a[..2], ["-M", "-N"]);
        assert_eq!(a[pos("-p") + 1], "2222");
        assert!(pos("-i") > pos("-F"));
        assert_eq!(a.last().unwrap(), "root@b1");
        assert_eq!(
            known_hosts(&d, "ssh-ed25519 AAAA x\n"),
            "b1 ssh-ed25519 AAAA x\n[b1]:2222 ssh-ed25519 AAAA x\n"
        );
    }

    /// The child's options join the master and fall back to a direct connection; the
    /// daemon's own options follow.
    #[test]
    fn child_options() {
        assert_eq!(
            child_sshopts(Path::new("/run/x/abc"), " -F /cfg "),
            "-o ControlPath=/run/x/abc -o ControlMaster=no -F /cfg"
        );
        assert_eq!(
            child_sshopts(Path::new("/run/x/abc"), ""),
            "-o ControlPath=/run/x/abc -o ControlMaster=no"
        );
        assert_eq!(
            split_sshopts(" -F  /cfg -p 22"),
            Some(vec!["-F".into(), "/cfg".into(), "-p".into(), "22".into()])
        );
        assert_eq!(split_sshopts("-o 'ProxyCommand=ssh -W %h:%p j'"), None);
    }

    /// Connecting ahead is due once per interval: the first caller stamps the time, the
    /// next within the interval is refused, one after it is due again.
    #[test]
    fn connect_ahead_is_rate_limited() {
        let tmp = tempfile::tempdir().unwrap();
        let stamp = tmp.path().join("ahead.stamp");
        let every = Duration::from_secs(30);
        let t0 = std::time::SystemTime::now();
        assert!(stamp_due(&stamp, every, t0));
        assert!(!stamp_due(&stamp, every, t0 + Duration::from_secs(10)));
        assert!(stamp_due(&stamp, every, t0 + Duration::from_secs(31)));
        assert!(!stamp_due(&stamp, every, t0 + Duration::from_secs(40)));
    }

    /// Control directories are checked when configured, and made private when used.
    #[test]
    fn control_directories() {
        assert!(check_control_dir(Path::new("/run/nixdispatch-hook-0")).is_ok());
        assert!(check_control_dir(Path::new("run/x")).is_err());
        assert!(check_control_dir(Path::new("/a b")).is_err());
        assert!(check_control_dir(Path::new("/a%d")).is_err());
        assert!(check_control_dir(&PathBuf::from(format!("/{}", "x".repeat(64)))).is_err());
        let tmp = tempfile::tempdir().unwrap();
        let uid = rustix::process::geteuid().as_raw();
        let dir = tmp.path().join("c");
        ensure_private_dir(&dir, uid).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // Opened to others, or owned by someone else: refused.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        assert!(
            ensure_private_dir(&dir, uid)
                .unwrap_err()
                .contains("open to others")
        );
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        assert!(
            ensure_private_dir(&dir, uid + 1)
                .unwrap_err()
                .contains("owned by")
        );
        let link = tmp.path().join("l");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(
            ensure_private_dir(&link, uid)
                .unwrap_err()
                .contains("not a directory")
        );
    }
}
