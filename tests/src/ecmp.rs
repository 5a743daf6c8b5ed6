//! An active/active fleet for tests: the usual topology, with the router's link toward the
//! balancers turned into a bridge (`brl`, 10.10.2.1) and up to 8 balancers on it
//! (balancer `i` in its own namespace, `l0` = 10.10.2.(2+i); balancer 0 is the topology's
//! `lb`). BIRD runs in the router with ECMP over BGP sessions to every balancer, with BFD;
//! each balancer runs its own BIRD, which exports the VIP routes the agent keeps in table
//! 4242. Every process and namespace goes on drop, also when a test fails.
//!
//! ```text
//!  client ── router (BIRD: BGP + BFD to each balancer, ECMP, L4 hash) ── br0 ── backends
//!                 └── brl ── l0 lb0 (maglb + BIRD)
//!                        ├── l0 lb1 (maglb + BIRD)
//!                        └── ...
//! ```

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use lb_userspace::datapath::{
    Mode,
    decap::{self, Decap},
};

use crate::{
    netns::{Netns, ip},
    topology::{self, LB_IF, Topology, VIP, wait_for},
};

pub const ROUTER_AS: u32 = 65000;
pub const BALANCER_AS: u32 = 65001;
/// The kernel table the agents keep their VIP routes in.
pub const TABLE: u32 = 4242;
/// The most balancers a fleet takes (router ports and BGP neighbours are set up for them).
pub const MAX_BALANCERS: usize = 4;

pub fn balancer_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 10, 2, 2 + i as u8)
}

/// The router's port toward balancer `i`.
pub fn router_port(i: usize) -> String {
    if i == 0 {
        "r1".into()
    } else {
        format!("rl{i}")
    }
}

/// A BIRD daemon in a namespace, in the foreground; killed on drop.
pub struct Bird {
    child: Option<Child>,
    pub ctl: PathBuf,
    pub log: PathBuf,
}

impl Bird {
    /// Writes `conf` to `dir/NAME.conf` and starts `bird -f` on it inside `ns`.
    pub fn start(ns: &Netns, dir: &Path, name: &str, conf: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = dir.join(format!("{name}.conf"));
        let ctl = dir.join(format!("{name}.ctl"));
        let log = dir.join(format!("{name}.log"));
        std::fs::write(&file, conf)?;
        let child = ns
            .command("bird")?
            .arg("-f")
            .arg("-c")
            .arg(&file)
            .arg("-s")
            .arg(&ctl)
            .arg("-P")
            .arg(dir.join(format!("{name}.pid")))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.stderr")))?)
            .spawn()
            .context("starting bird (Debian package bird2; `cargo xtask setup`)")?;
        let mut b = Self {
            child: Some(child),
            ctl,
            log,
        };
        let up = wait_for(Duration::from_secs(5), || {
            b.birdc(&["show", "status"]).contains("Daemon is up")
        });
        let exited = b
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some());
        if !up || exited {
            bail!(
                "bird {name} did not open its control socket: {}",
                std::fs::read_to_string(dir.join(format!("{name}.stderr"))).unwrap_or_default()
            );
        }
        Ok(b)
    }

    /// `birdc -s CTL ARGS...`
    pub fn birdc(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("birdc")
            .arg("-s")
            .arg(&self.ctl)
            .args(args)
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no withdraw, no goodbye; only BFD tells the router.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends `signal` (e.g. SIGSTOP: a hung BIRD sends no BFD and closes no session).
    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, signal) };
        }
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// BFD as the issue asks for: 100 ms × 3, so a lost peer is noticed within 300 ms.
const BFD: &str = "interval 100 ms; multiplier 3;";
/// BGP timers for tests: reconnect at once, so a returning or added balancer peers fast.
const BGP_TIMERS: &str = "connect delay time 1; connect retry time 1; error wait time 1, 2; hold time 9; keepalive time 3;";

/// The router's BIRD: ECMP over every balancer (merge paths), BFD on every session.
pub fn router_conf(log: &Path, balancers: usize) -> String {
    let mut c = format!(
        "log \"{}\" all;\nrouter id 10.10.2.1;\n\
         protocol device {{ scan time 2; }}\n\
         protocol bfd {{ interface \"brl\" {{ {BFD} }}; }}\n\
         protocol kernel {{\n  ipv4 {{ import none; export all; }};\n  merge paths on limit 16;\n}}\n\
         template bgp balancer {{\n  local 10.10.2.1 as {ROUTER_AS};\n  bfd on;\n  {BGP_TIMERS}\n  \
         ipv4 {{ import all; export none; }};\n}}\n",
        log.display()
    );
    for i in 0..balancers {
        c += &format!(
            "protocol bgp lb{i} from balancer {{ neighbor {} as {BALANCER_AS}; }}\n",
            balancer_addr(i)
        );
    }
    c
}

/// A balancer's BIRD: learns the agent's table and exports it to the router, with BFD.
/// (The same as `packaging/bird/balancer.conf`, with test addresses and timers.)
pub fn balancer_conf(log: &Path, i: usize) -> String {
    let me = balancer_addr(i);
    format!(
        "log \"{}\" all;\nrouter id {me};\n\
         protocol device {{ scan time 2; }}\n\
         protocol kernel maglb_vips {{\n  kernel table {TABLE};\n  learn;\n  scan time 1;\n  \
         ipv4 {{ import all; export none; }};\n}}\n\
         protocol bfd {{ interface \"{LB_IF}\" {{ {BFD} }}; }}\n\
         protocol bgp uplink {{\n  local {me} as {BALANCER_AS};\n  neighbor 10.10.2.1 as {ROUTER_AS};\n  \
         bfd on;\n  {BGP_TIMERS}\n  ipv4 {{ import none; export where proto = \"maglb_vips\"; }};\n}}\n",
        log.display()
    )
}

/// No unknown-unicast flooding toward a balancer, as on a routed link to it. When a
/// balancer's port goes down the bridge forgets its MAC; flooded, the frames still addressed
/// to it would reach the other balancers, whose XDP programs take any frame to a VIP whatever
/// its destination MAC, and a lost balancer would lose nothing.
fn no_flood(r: &Netns, port: &str) -> anyhow::Result<()> {
    r.exec("bridge", &["link", "set", "dev", port, "flood", "off"])?;
    Ok(())
}

/// The fleet's namespaces and links (balancer 0 is `t.lb`).
pub struct Fleet {
    /// Pass programs on the router's balancer ports (frames sent back with XDP_TX arrive
    /// only at a veth peer that runs XDP).
    _pass: Vec<Decap>,
    pub balancers: Vec<Option<Netns>>,
    pub t: Topology,
}

impl Fleet {
    /// The topology (no decap programs: tests attach them with `maglb decap attach`) with
    /// the router's balancer link made a bridge, and no VIP route: BGP brings it.
    pub fn build(tag: &str, backends: usize) -> anyhow::Result<Self> {
        let t = Topology::build_with(tag, backends, false)?;
        let r = &t.router;
        topology::router_bridge(r)?;
        no_flood(r, "r1")?;
        // ECMP on the 5-tuple, so one client's connections spread over the balancers.
        r.sysctl("net.ipv4.fib_multipath_hash_policy=1")?;
        let _ = r.ip(&["route", "del", &format!("{VIP}/32")]);
        let _ = r.ip(&["-6", "route", "del", "fd20::1/128"]);
        Ok(Self {
            _pass: Vec::new(),
            balancers: (0..MAX_BALANCERS).map(|_| None).collect(),
            t,
        })
    }

    /// The namespace of balancer `i`, once added.
    pub fn lb(&self, i: usize) -> &Netns {
        if i == 0 {
            &self.t.lb
        } else {
            self.balancers[i].as_ref().expect("balancer added")
        }
    }

    /// Wires balancer `i` (1..MAX_BALANCERS) to the router's bridge.
    pub fn add_balancer(&mut self, i: usize) -> anyhow::Result<()> {
        assert!((1..MAX_BALANCERS).contains(&i));
        let ns = Netns::new(&format!("{}{i}", self.t.lb.name))?;
        let port = router_port(i);
        ip(&[
            "link",
            "add",
            &port,
            "netns",
            &self.t.router.name,
            "type",
            "veth",
            "peer",
            "name",
            LB_IF,
            "netns",
            &ns.name,
        ])?;
        let r = &self.t.router;
        r.ip(&["link", "set", &port, "master", "brl"])?;
        no_flood(r, &port)?;
        r.exec(
            "ethtool",
            &[
                "-K", &port, "tx", "off", "tso", "off", "gso", "off", "gro", "off",
            ],
        )?;
        r.ip(&["link", "set", &port, "up"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/24", balancer_addr(i)),
            "dev",
            LB_IF,
        ])?;
        ns.exec(
            "ethtool",
            &[
                "-K", LB_IF, "tx", "off", "tso", "off", "gso", "off", "gro", "off",
            ],
        )?;
        ns.ip(&["link", "set", LB_IF, "up"])?;
        ns.ip(&["route", "add", "default", "via", "10.10.2.1"])?;
        let pass = r.run(move || -> anyhow::Result<Decap> {
            let mut d = Decap::load()?;
            d.attach(decap::PASS_PROGRAM, &port, Mode::Native)?;
            Ok(d)
        })??;
        self._pass.push(pass);
        self.balancers[i] = Some(ns);
        Ok(())
    }

    /// The router's next hops for the VIP now (balancer addresses), sorted.
    pub fn nexthops(&self) -> Vec<Ipv4Addr> {
        let out = self
            .t
            .router
            .ip(&["route", "show", &format!("{VIP}/32")])
            .unwrap_or_default();
        parse_nexthops(&out)
    }
}

/// The gateways in `ip route show` output (one route, single or multipath).
pub fn parse_nexthops(out: &str) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = out
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "via")
        .filter_map(|w| w[1].parse().ok())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Sets `ifname` in `ns` down (or up) with one ioctl, and returns when that returned: the
/// moment of a cut, to the microsecond (an `ip link` command would add its own start-up).
pub fn set_link(ns: &Netns, ifname: &str, up: bool) -> anyhow::Result<(Instant, SystemTime)> {
    let name = ifname.to_owned();
    let r = ns.run(move || -> std::io::Result<(Instant, SystemTime)> {
        // SAFETY: plain socket and ioctl calls on a zeroed `ifreq` holding a NUL-terminated
        // name shorter than IFNAMSIZ; the descriptor is closed before returning.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut req: libc::ifreq = std::mem::zeroed();
            for (d, s) in req.ifr_name.iter_mut().zip(name.bytes().take(15)) {
                *d = s as libc::c_char;
            }
            let res = (|| {
                if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let flags = req.ifr_ifru.ifru_flags;
                let up_flag = libc::IFF_UP as libc::c_short;
                req.ifr_ifru.ifru_flags = if up {
                    flags | up_flag
                } else {
                    flags & !up_flag
                };
                if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok((Instant::now(), SystemTime::now()))
            })();
            libc::close(fd);
            res
        }
    })?;
    Ok(r?)
}

/// `[2026-12-02T06:06:57.752002]`, as `ip -ts` prints it in UTC, as a time.
fn parse_stamp(s: &str) -> Option<SystemTime> {
    let s = s.strip_prefix('[')?.split(']').next()?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.')?;
    let mut t = hms.split(':').map(|x| x.parse::<i64>());
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let micros: u64 = frac.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(UNIX_EPOCH + Duration::from_secs(secs as u64) + Duration::from_micros(micros))
}

/// `ip -ts -o monitor route` in the router: every message with the time `ip` read it from
/// the kernel (not when this process got it through a pipe), to measure when the kernel's
/// route changed.
pub struct RouteWatch {
    child: Child,
    pub events: Arc<Mutex<Vec<(SystemTime, String)>>>,
}

impl RouteWatch {
    pub fn start(router: &Netns) -> anyhow::Result<Self> {
        let mut child = std::process::Command::new("ip")
            .args(["-n", &router.name, "-ts", "-o", "monitor", "route"])
            .env("TZ", "UTC")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out = child.stdout.take().context("monitor output")?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let at = parse_stamp(&line).unwrap_or_else(SystemTime::now);
                let text = line
                    .split_once("] ")
                    .map_or(line.as_str(), |x| x.1)
                    .to_owned();
                ev.lock().unwrap().push((at, text));
            }
        });
        // Let the monitor subscribe before anything happens.
        std::thread::sleep(Duration::from_millis(100));
        Ok(Self { child, events })
    }

    /// The first change to the VIP's route after `since` that stops using `lost`: a
    /// replacement without it, or the deletion of a route with it.
    pub fn lost_at(&self, since: SystemTime, lost: Ipv4Addr) -> Option<SystemTime> {
        let via = format!("via {lost} ");
        let vip = format!("{VIP} ");
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, l)| *t >= since && l.contains(&vip))
            .find(|(_, l)| {
                let deleted = l.starts_with("Deleted");
                (deleted && l.contains(&via)) || (!deleted && !l.contains(&via))
            })
            .map(|(t, _)| *t)
    }

    /// The first change to the VIP's route after `since` that uses `added`.
    pub fn added_at(&self, since: SystemTime, added: Ipv4Addr) -> Option<SystemTime> {
        let via = format!("via {added} ");
        let vip = format!("{VIP} ");
        self.events
            .lock()
            .unwrap()
            .iter()
            .find(|(t, l)| {
                *t >= since && l.contains(&vip) && !l.starts_with("Deleted") && l.contains(&via)
            })
            .map(|(t, _)| *t)
    }
}

impl Drop for RouteWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_timestamps_parse() {
        let t = parse_stamp("[2026-12-02T06:06:57.752002] 10.9.9.9 dev lo").unwrap();
        let d = t.duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(d.as_secs(), 1_796_191_617);
        assert_eq!(d.subsec_micros(), 752_002);
        assert_eq!(parse_stamp("10.9.9.9 dev lo"), None);
    }
}
