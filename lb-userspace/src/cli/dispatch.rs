//! What each subcommand does: `agent` runs the daemon, `decap` works on a backend without an
//! agent, every other subcommand is one or a few API calls.

use std::{
    io::{IsTerminal as _, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use clap::CommandFactory as _;

use super::{
    Error,
    args::{
        AffinityArg, BackendCmd, BgpCmd, Cli, Cmd, ConfigCmd, DecapCmd, LogFormat, OnOff, Output,
        VipCmd, VrrpCmd,
    },
    output,
};
use crate::{
    agent,
    api::{
        self,
        client::{self, ClientError},
    },
    datapath::decap,
    state::{Affinity, AttachMode, RateLimit, State},
};

/// The socket for reads: the API socket, or the read-only one when the API socket is not
/// open to this user.
fn reader(cli: &Cli) -> PathBuf {
    match std::os::unix::net::UnixStream::connect(&cli.socket) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => cli
            .read_socket
            .clone()
            .unwrap_or_else(|| api::read_socket_for(&cli.socket)),
        _ => cli.socket.clone(),
    }
}

fn send(
    sock: &Path,
    method: &str,
    path: &str,
    body: &impl serde::Serialize,
) -> Result<api::Changes, ClientError> {
    client::send(sock, method, path, body)
}

pub fn run(cli: Cli, out: &mut impl Write) -> Result<(), Error> {
    let sock = cli.socket.as_path();
    let read = reader(&cli);
    let read = read.as_path();
    let post = |path: &str| send(sock, "POST", path, &());
    match cli.cmd {
        Cmd::Agent { .. } => run_agent(cli)?,
        Cmd::Attach { iface, mode } => {
            let req = api::AttachRequest {
                iface,
                mode: mode.into(),
            };
            output::changes(out, &send(sock, "POST", "/v1/attach", &req)?)?;
        }
        Cmd::Detach => output::changes(out, &post("/v1/detach")?)?,
        Cmd::Vip { cmd } => vip(sock, read, cmd, out)?,
        Cmd::Backend { cmd } => backend(sock, read, cmd, out)?,
        Cmd::Health { output } => show(
            read,
            "/v1/health",
            output,
            out,
            |o, p: &Vec<api::ProbeView>| output::probes(o, p),
        )?,
        Cmd::Stats {
            watch: true,
            interval_ms,
            count,
            ..
        } => watch(read, Duration::from_millis(interval_ms), count, out)?,
        Cmd::Stats { output, .. } => show(read, "/v1/stats", output, out, output::stats)?,
        Cmd::Status { output } => show(read, "/v1/status", output, out, output::status)?,
        Cmd::Apply { file } => {
            let text = read_file(&file)?;
            // Checked here first: a bad file never reaches the agent.
            State::from_toml(&text).map_err(|e| format!("{}: {e}", file.display()))?;
            let c = send(sock, "POST", "/v1/apply", &api::ConfigText { config: text })?;
            output::changes(out, &c)?;
        }
        Cmd::Validate { file } => validate(read, &file, out)?,
        Cmd::Vrrp { cmd } => match cmd {
            VrrpCmd::Status { output } => show(read, "/v1/vrrp", output, out, output::vrrp)?,
            VrrpCmd::Release => output::changes(out, &post("/v1/vrrp/release")?)?,
            VrrpCmd::Claim => output::changes(out, &post("/v1/vrrp/claim")?)?,
        },
        Cmd::Bgp { cmd } => match cmd {
            BgpCmd::Status { output } => show(read, "/v1/bgp", output, out, output::bgp)?,
            BgpCmd::Withdraw => output::changes(out, &post("/v1/bgp/withdraw")?)?,
            BgpCmd::Announce => output::changes(out, &post("/v1/bgp/announce")?)?,
        },
        Cmd::Config {
            cmd: ConfigCmd::Export,
        } => {
            let c: api::ConfigText = client::get(read, "/v1/config")?;
            write!(out, "{}", c.config)?;
        }
        Cmd::Verify => verify(sock, out)?,
        Cmd::Decap { cmd } => decap_cmd(cmd, out)?,
        Cmd::Completions { shell } => {
            // clap_complete panics on a failed write (`maglb completions bash | head`):
            // generate into memory, then write like every other command.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "maglb", &mut script);
            out.write_all(&script)?;
        }
        Cmd::Man { out_dir: None } => out.write_all(&man_page()?)?,
        Cmd::Man { out_dir: Some(dir) } => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .map_err(|e| format!("writing man pages to {}: {e}", dir.display()))?;
            writeln!(out, "man pages written to {}", dir.display())?;
        }
    }
    out.flush()?;
    Ok(())
}

/// `maglb agent`: runs the agent until it is stopped.
fn run_agent(cli: Cli) -> Result<(), Error> {
    let Cmd::Agent {
        state_dir,
        bpffs,
        log_format,
        metrics_listen,
        read_socket_path,
        initial_config,
        start_empty,
    } = cli.cmd
    else {
        unreachable!("run_agent is called for `maglb agent` only")
    };
    let metrics = match metrics_listen.as_str() {
        "off" => None,
        a => Some(a.parse().map_err(|_| {
            format!("--metrics-listen {a:?}: expected ADDR:PORT (e.g. 127.0.0.1:9477) or off")
        })?),
    };
    init_logs(log_format);
    agent::run(agent::Options {
        read_socket: match read_socket_path.as_deref() {
            Some("off") => None,
            Some(p) => Some(p.into()),
            None => Some(api::read_socket_for(&cli.socket)),
        },
        socket: cli.socket,
        state_dir,
        bpffs,
        metrics,
        initial_config,
        start_empty,
    })?;
    Ok(())
}

/// A GET of `path` on the read socket, printed as JSON or as the table `table` makes of it.
fn show<T: serde::de::DeserializeOwned, W: Write>(
    read: &Path,
    path: &str,
    output: Output,
    out: &mut W,
    table: impl FnOnce(&mut W, &T) -> std::io::Result<()>,
) -> Result<(), Error> {
    let body = client::call(read, "GET", path, None)?;
    match output {
        Output::Json => output::json(out, &body)?,
        Output::Table => table(out, &serde_json::from_str(&body)?)?,
    }
    Ok(())
}

/// `maglb verify`: the differences between the maps and the state, an error if any.
fn verify(sock: &Path, out: &mut impl Write) -> Result<(), Error> {
    let v: api::Verification = client::get(sock, "/v1/verify")?;
    for d in &v.differences {
        writeln!(out, "{d}")?;
    }
    if !v.differences.is_empty() {
        return Err(format!(
            "{} differences between the maps and the state",
            v.differences.len()
        )
        .into());
    }
    Ok(())
}

fn vip(sock: &Path, read: &Path, cmd: VipCmd, out: &mut impl Write) -> Result<(), Error> {
    match cmd {
        VipCmd::Add {
            vip,
            affinity,
            ring_size,
            adaptive_weights,
        } => {
            let req = api::VipRequest {
                address: vip,
                affinity: affinity.map(|AffinityArg::SrcIp| Affinity::SrcIp),
                ring_size,
                adaptive_weights: adaptive_weights.then_some(true),
            };
            output::changes(out, &send(sock, "POST", "/v1/vips", &req)?)?;
        }
        VipCmd::Set {
            vip,
            adaptive_weights,
        } => {
            let Some(aw) = adaptive_weights else {
                return Err("nothing to set: give --adaptive-weights on|off".into());
            };
            let req = api::VipSetRequest {
                address: vip,
                adaptive_weights: Some(aw == OnOff::On),
            };
            output::changes(out, &send(sock, "POST", "/v1/vips/set", &req)?)?;
        }
        VipCmd::Switch { vip, to, percent } => {
            let req = api::SwitchRequest {
                address: vip,
                to,
                percent,
            };
            output::changes(out, &send(sock, "POST", "/v1/vips/switch", &req)?)?;
        }
        VipCmd::Health {
            vip,
            default,
            check,
        } => {
            if !default && check.kind.is_none() {
                return Err(
                    "give --kind (none turns probing off) or --default (a TCP connect to the VIP's port)"
                        .into(),
                );
            }
            let req = api::HealthRequest {
                vip,
                backend: None,
                health: (!default).then(|| check.check()),
            };
            output::changes(out, &send(sock, "POST", "/v1/health", &req)?)?;
        }
        VipCmd::Policy {
            vip,
            rate_limit,
            rate_burst,
            cap,
            cap_burst,
            allow,
            deny,
        } => {
            let rate = |r: Option<u32>, b: Option<u32>| {
                r.map(|r| RateLimit {
                    new_flows_per_s: r,
                    burst: b.unwrap_or(r),
                })
            };
            let req = api::PolicyRequest {
                address: vip,
                rate_limit: rate(rate_limit, rate_burst),
                new_flow_cap: rate(cap, cap_burst),
                allow,
                deny,
            };
            output::changes(out, &send(sock, "POST", "/v1/vips/policy", &req)?)?;
        }
        VipCmd::Del { vip } => output::changes(
            out,
            &send(sock, "DELETE", "/v1/vips", &api::VipRef { address: vip })?,
        )?,
        VipCmd::List { output } => {
            let body = client::call(read, "GET", "/v1/vips", None)?;
            match output {
                Output::Json => output::json(out, &body)?,
                Output::Table => {
                    output::vips(out, &serde_json::from_str::<Vec<api::VipView>>(&body)?)?
                }
            }
        }
    }
    Ok(())
}

fn backend(sock: &Path, read: &Path, cmd: BackendCmd, out: &mut impl Write) -> Result<(), Error> {
    let req = |vip, address, weight| api::BackendRequest {
        vip,
        address,
        weight,
        backup: None,
        pool: None,
    };
    let (method, path, body) = match cmd {
        BackendCmd::Add {
            vip,
            address,
            weight,
            backup,
            pool,
        } => {
            let mut r = req(vip, address, Some(weight));
            r.backup = Some(backup);
            r.pool = pool;
            ("POST", "/v1/backends", r)
        }
        BackendCmd::Del { vip, address } => ("DELETE", "/v1/backends", req(vip, address, None)),
        BackendCmd::SetWeight {
            vip,
            address,
            weight,
        } => (
            "POST",
            "/v1/backends/weight",
            req(vip, address, Some(weight)),
        ),
        BackendCmd::Drain { vip, address } => {
            ("POST", "/v1/backends/drain", req(vip, address, None))
        }
        BackendCmd::Disable { vip, address } => {
            ("POST", "/v1/backends/disable", req(vip, address, None))
        }
        BackendCmd::Enable { vip, address } => {
            ("POST", "/v1/backends/enable", req(vip, address, None))
        }
        BackendCmd::Health {
            vip,
            address,
            inherit,
            check,
        } => {
            if !inherit && check.kind.is_none() {
                return Err(
                    "give --kind (none turns checks off for this backend) or --inherit".into(),
                );
            }
            let r = api::HealthRequest {
                vip,
                backend: Some(address),
                health: (!inherit).then(|| check.check()),
            };
            return Ok(output::changes(
                out,
                &send(sock, "POST", "/v1/health", &r)?,
            )?);
        }
        BackendCmd::List { vip, output } => {
            let vips: Vec<api::VipView> = client::get(read, "/v1/vips")?;
            if let Some(v) = &vip
                && !vips.iter().any(|x| x.address == *v)
            {
                return Err(format!("VIP {v} does not exist: see `maglb vip list`").into());
            }
            let vips: Vec<_> = vips
                .into_iter()
                .filter(|v| vip.is_none_or(|id| v.address == id))
                .collect();
            return {
                let _: () = match output {
                    Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&vips)?)?,
                    Output::Table => output::backends(out, &vips)?,
                };
                Ok(())
            };
        }
    };
    output::changes(out, &send(sock, method, path, &body)?)?;
    Ok(())
}

fn validate(read: &Path, file: &Path, out: &mut impl Write) -> Result<(), Error> {
    let text = read_file(file)?;
    let s = State::from_toml(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let backends: usize = s.vips.iter().map(|v| v.backends.len()).sum();
    writeln!(
        out,
        "{} is valid: {} VIPs, {backends} backends",
        file.display(),
        s.vips.len()
    )?;
    match client::send::<_, api::Changes>(
        read,
        "POST",
        "/v1/validate",
        &api::ConfigText { config: text },
    ) {
        Ok(c) if c.changes.is_empty() => writeln!(out, "apply would change nothing")?,
        Ok(c) => {
            writeln!(out, "apply would:")?;
            for l in c.changes {
                writeln!(out, "  {l}")?;
            }
        }
        Err(ClientError::NoAgent { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

fn decap_cmd(cmd: DecapCmd, out: &mut impl Write) -> Result<(), Error> {
    match cmd {
        DecapCmd::Attach {
            iface,
            mode,
            gue_port,
            pin_dir,
        } => {
            let mode = AttachMode::from(mode).to_mode();
            let addrs = decap::attach_pinned(&pin_dir, &iface, mode, gue_port)?;
            let gue = match gue_port {
                0 => String::new(),
                p => format!(" and GUE on UDP port {p}"),
            };
            writeln!(
                out,
                "decap attached to {iface}; decapsulating IP-in-IP{gue} to {} local addresses",
                addrs.len()
            )?;
        }
        DecapCmd::Detach { iface, pin_dir } => {
            decap::detach_pinned(&pin_dir, &iface)?;
            writeln!(out, "decap detached from {iface}")?;
        }
        DecapCmd::Status { pin_dir, output } => {
            let st = decap::status_pinned(&pin_dir)?;
            match output {
                Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&st)?)?,
                Output::Table => output::decap(out, &st, &pin_dir)?,
            }
        }
    }
    Ok(())
}

/// `maglb stats --watch`: rates between two refreshes, per VIP and backend.
fn watch(
    sock: &Path,
    every: Duration,
    count: Option<u64>,
    out: &mut impl Write,
) -> Result<(), Error> {
    let tty = std::io::stdout().is_terminal();
    let mut prev: api::Stats = client::get(sock, "/v1/stats")?;
    let mut at = Instant::now();
    for _ in 0..count.unwrap_or(u64::MAX) {
        std::thread::sleep(every);
        let cur: api::Stats = client::get(sock, "/v1/stats")?;
        let dt = at.elapsed().as_secs_f64();
        at = Instant::now();
        output::rates(out, &prev, &cur, dt, every, tty)?;
        prev = cur;
    }
    Ok(())
}

/// maglb(1), in roff.
fn man_page() -> std::io::Result<Vec<u8>> {
    let mut page = Vec::new();
    // As in the per-subcommand pages: no maglb-help(1), which has no page of its own.
    clap_mangen::Man::new(Cli::command().disable_help_subcommand(true)).render(&mut page)?;
    Ok(page)
}

fn read_file(p: &Path) -> Result<String, String> {
    std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()))
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAGLB_LOG")
        // rustls-platform-verifier logs an ERROR for every certificate it refuses: a probe
        // of a backend with a bad certificate would log one per interval. The probe's
        // result carries the reason, and each up/down transition is logged.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,rustls_platform_verifier=off")
        });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    /// The subcommands an operator looks for in the man page.
    const SUBCOMMANDS: &[&str] = &[
        "agent",
        "attach",
        "vip",
        "backend",
        "health",
        "stats",
        "status",
        "apply",
        "vrrp",
        "decap",
        "completions",
    ];

    #[test]
    fn man_page_names_the_subcommands_and_renders() {
        let page = String::from_utf8(man_page().unwrap()).unwrap();
        assert!(
            page.starts_with(".ie") || page.contains(".TH maglb 1"),
            "{page}"
        );
        for s in SUBCOMMANDS {
            assert!(
                page.contains(&format!("maglb\\-{s}(1)")),
                "no {s} in\n{page}"
            );
        }
        // Rendered by man(1) where it is installed (Debian: man-db), as a reader sees it.
        let dir = std::env::temp_dir().join(format!("maglb-man-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("maglb.1");
        std::fs::write(&file, &page).unwrap();
        let shown = std::process::Command::new("man")
            .arg("-l")
            .arg(&file)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output();
        let _ = std::fs::remove_dir_all(&dir);
        match shown {
            Ok(o) if o.status.success() => {
                let text = String::from_utf8_lossy(&o.stdout);
                for heading in ["NAME", "SYNOPSIS", "SUBCOMMANDS"] {
                    assert!(text.contains(heading), "man -l shows no {heading}:\n{text}");
                }
                assert!(text.contains("maglb-vip(1)"), "{text}");
            }
            Ok(o) => panic!("man -l failed: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => eprintln!("man(1) not installed ({e}); checked the roff text only"),
        }
    }

    #[test]
    fn man_pages_for_every_subcommand() {
        let dir = std::env::temp_dir().join(format!("maglb-mans-{}", std::process::id()));
        let cli =
            Cli::try_parse_from(["maglb", "man", "--out-dir", dir.to_str().unwrap()]).unwrap();
        let mut out = Vec::new();
        run(cli, &mut out).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let _ = std::fs::remove_dir_all(&dir);
        for s in SUBCOMMANDS {
            assert!(names.contains(&format!("maglb-{s}.1")), "{names:?}");
        }
        assert!(names.contains(&"maglb.1".to_owned()));
        assert!(names.contains(&"maglb-vip-add.1".to_owned()));
    }

    #[test]
    fn completions_for_bash_zsh_and_fish() {
        for (shell, marker) in [
            ("bash", "complete -F"),
            ("zsh", "#compdef maglb"),
            ("fish", "complete -c maglb"),
        ] {
            let cli = Cli::try_parse_from(["maglb", "completions", shell]).unwrap();
            let mut out = Vec::new();
            run(cli, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains(marker), "{shell}: {text}");
            assert!(text.contains("backend"), "{shell}: no subcommands");
        }
    }
}
