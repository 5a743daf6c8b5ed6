//! Schema, validation, operations, change lines and specs, without root.

use std::{collections::BTreeMap, net::IpAddr};

use super::*;

/// The HTTP status the API answers a refusal with (400, 404 or 409), to compare kinds.
trait Code {
    fn code(&self) -> u16;
}

impl Code for Refusal {
    fn code(&self) -> u16 {
        match self {
            Refusal::Invalid(_) => 400,
            Refusal::NotFound(_) => 404,
            Refusal::Conflict(_) => 409,
        }
    }
}

fn id(s: &str) -> VipId {
    s.parse().unwrap()
}

const EXAMPLE: &str = r#"
[balancer]
interface = "eth0"
mode = "native"
mtu = 1500
nexthop = "10.0.0.1"

[[vip]]
address = "10.200.0.1:80/tcp"

  [[vip.backend]]
  address = "10.10.3.11"
  weight = 2

  [[vip.backend]]
  address = "10.10.3.12"
  state = "drain"

[[vip]]
address = "[fd20::1]:0/udp"
affinity = "src-ip"
ring_size = 251
backend = [{ address = "fd10:3::11" }]
"#;

#[test]
fn toml_round_trip() {
    let s = State::from_toml(EXAMPLE).unwrap();
    assert_eq!(s.vips.len(), 2);
    assert_eq!(s.vips[0].backends[0].weight, 2);
    assert_eq!(s.vips[0].backends[1].state, BackendState::Drain);
    assert_eq!(s.vips[0].backends[1].weight, 1);
    assert_eq!(s.vips[1].affinity, Some(Affinity::SrcIp));
    assert_eq!(State::from_toml(&s.to_toml()).unwrap(), s);
    let spec = s.vips[0].spec(|_| true);
    assert_eq!(
        spec.backends[1].weight, 0,
        "drained backend takes no new flows"
    );
}

#[test]
fn bad_configs_name_the_field() {
    let cases = [
        ("[balancer]\ninterfce = \"eth0\"", "unknown field"),
        ("[[vip]]\naddress = \"10.0.0.1:80\"", "missing /tcp"),
        ("[[vip]]\naddress = \"10.0.0.1:99999/tcp\"", "port"),
        (
            "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nring_size = 65536",
            "ring_size",
        ),
        (
            "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nbackend = [{address = \"10.1.0.1\", weight = 70000}]",
            "weight 70000",
        ),
        (
            "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nbackend = [{address = \"10.1.0.1\"}, {address = \"10.1.0.1\"}]",
            "listed twice",
        ),
        (
            "[[vip]]\naddress = \"[fd00::1]:80/tcp\"\nbackend = [{address = \"10.1.0.1\"}]",
            "IPv4 backend",
        ),
        (
            "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[[vip]]\naddress = \"10.0.0.1:80/tcp\"",
            "listed twice",
        ),
        ("[balancer]\nnexthop_mac = \"zz\"", "nexthop_mac"),
        ("[balancer]\nmtu = 100", "balancer.mtu"),
        ("[balancer]\ninterface = \"a/b\"", "interface"),
        ("version = 2", "unsupported version"),
        (
            "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nbackend = [{address = \"not-an-ip\"}]",
            "invalid",
        ),
    ];
    for (text, want) in cases {
        let err = State::from_toml(text).unwrap_err();
        assert!(err.to_string().contains(want), "{text:?}: {err}");
        assert_eq!(err.code(), 400);
    }
}

#[test]
fn operations_validate_and_leave_the_state_unchanged_on_error() {
    let s0 = State::default();
    let v = id("10.0.0.1:80/tcp");
    let s1 = s0.with_vip(Vip::new(v)).unwrap();
    assert_eq!(s1.with_vip(Vip::new(v)).unwrap_err().code(), 409);
    let b: IpAddr = "10.1.0.1".parse().unwrap();
    let s2 = s1.with_backend(&v, BackendEntry::new(b, 3)).unwrap();
    assert_eq!(
        s2.with_backend(&v, BackendEntry::new(b, 1))
            .unwrap_err()
            .code(),
        409
    );
    assert_eq!(
        s2.with_weight(&v, b, MAX_WEIGHT + 1).unwrap_err().code(),
        400
    );
    let other = id("10.0.0.2:80/tcp");
    assert_eq!(
        s2.with_backend(&other, BackendEntry::new(b, 1))
            .unwrap_err()
            .code(),
        404
    );
    assert_eq!(
        s2.without_backend(&v, "10.9.9.9".parse().unwrap())
            .unwrap_err()
            .code(),
        404
    );
    let s3 = s2.with_backend_state(&v, b, BackendState::Drain).unwrap();
    assert_eq!(s3.vips[0].backends[0].state, BackendState::Drain);
    let s4 = s3.with_weight(&v, b, 5).unwrap();
    assert_eq!(s4.vips[0].backends[0].state, BackendState::Active);
    assert_eq!(s4.without_vip(&v).unwrap(), s0);
    assert_eq!(s0.with_detach().unwrap_err().code(), 409);
    assert_eq!(
        s0.with_attach("a b", AttachMode::Native)
            .unwrap_err()
            .code(),
        400
    );
    // Untouched by all the refusals above.
    assert_eq!(s2.vips[0].backends[0].weight, 3);
}

#[test]
fn diff_says_what_changes() {
    let a = State::from_toml(EXAMPLE).unwrap();
    let mut b = a.clone();
    b.vips[0].backends[0].weight = 9;
    b.vips.remove(1);
    b.vips.push(Vip::new(id("10.9.0.1:53/udp")));
    b.vips[0].backends[1].state = BackendState::Active;
    b.balancer.interface = None;
    let d = a.diff(&b);
    assert_eq!(
        d,
        [
            "detach from eth0",
            "VIP 10.200.0.1:80/tcp: backend 10.10.3.11 weight 2 -> 9",
            "VIP 10.200.0.1:80/tcp: backend 10.10.3.12 drain -> active",
            "add VIP 10.9.0.1:53/udp with 0 backends",
            "note: VIP 10.9.0.1:53/udp: not health-checked: a UDP VIP has no default check \
             (set one, e.g. `maglb vip health VIP --kind udp --payload PING` or `--kind tcp \
             --port N`, or kind = \"none\")",
            "delete VIP [fd20::1]:0/udp",
        ]
    );
    assert!(a.diff(&a).is_empty());
}

fn vip3() -> Vip {
    let mut v = Vip::new(id("10.0.0.1:80/tcp"));
    for (i, pool) in ["blue", "blue", "green"].iter().enumerate() {
        let mut b = BackendEntry::new(format!("10.1.0.{i}").parse().unwrap(), 1);
        b.pool = Some(pool.to_string());
        v.backends.push(b);
    }
    v
}

fn weights(v: &Vip, up: impl Fn(&IpAddr) -> bool) -> Vec<(u32, bool)> {
    v.spec(up)
        .backends
        .iter()
        .map(|b| (b.weight, b.live))
        .collect()
}

#[test]
fn spec_follows_health_state_backups_and_pools() {
    let all = |_: &IpAddr| true;
    let mut v = vip3();
    assert_eq!(weights(&v, all), [(1, true), (1, true), (1, true)]);
    // Down: not live. Disabled: not live. Drained: live, no weight.
    let down0 = |a: &IpAddr| a.to_string() != "10.1.0.0";
    assert_eq!(weights(&v, down0), [(0, false), (1, true), (1, true)]);
    v.backends[1].state = BackendState::Disabled;
    v.backends[2].state = BackendState::Drain;
    assert_eq!(weights(&v, all), [(1, true), (0, false), (0, true)]);
    // Backups serve only while no primary is up; then all of them share.
    let mut v = vip3();
    v.backends[2].backup = true;
    assert_eq!(weights(&v, all), [(1, true), (1, true), (0, true)]);
    let primaries_down = |a: &IpAddr| a.to_string() == "10.1.0.2";
    assert_eq!(
        weights(&v, primaries_down),
        [(0, false), (0, false), (1, true)]
    );
    // Pools: only the active pool takes new flows; splits give shares by pool.
    let mut v = vip3();
    v.pools = BTreeMap::from([("blue".into(), 100)]);
    assert_eq!(weights(&v, all), [(5000, true), (5000, true), (0, true)]);
    v.pools = BTreeMap::from([("blue".into(), 75), ("green".into(), 25)]);
    assert_eq!(weights(&v, all), [(3750, true), (3750, true), (2500, true)]);
    // A down backend's share goes to the rest of its pool.
    assert_eq!(weights(&v, down0), [(0, false), (7500, true), (2500, true)]);
}

#[test]
fn switch_moves_all_or_part_of_the_new_flows() {
    let v = vip3();
    let s = State::default().with_vip(v).unwrap();
    let id = id("10.0.0.1:80/tcp");
    let s1 = s.with_switch(&id, "blue", None).unwrap();
    assert_eq!(s1.vips[0].pools, BTreeMap::from([("blue".into(), 100)]));
    let s2 = s1.with_switch(&id, "green", Some(5)).unwrap();
    assert_eq!(
        s2.vips[0].pools,
        BTreeMap::from([("blue".into(), 95), ("green".into(), 5)])
    );
    let s3 = s2.with_switch(&id, "green", Some(25)).unwrap();
    assert_eq!(
        s3.vips[0].pools,
        BTreeMap::from([("blue".into(), 75), ("green".into(), 25)])
    );
    let s4 = s3.with_switch(&id, "green", None).unwrap();
    assert_eq!(s4.vips[0].pools, BTreeMap::from([("green".into(), 100)]));
    // Rolling back is the same command.
    assert_eq!(s4.with_switch(&id, "blue", None).unwrap(), s1);
    assert_eq!(s1.with_switch(&id, "red", None).unwrap_err().code(), 400);
    assert_eq!(
        s1.with_switch(&id, "blue", Some(50)).unwrap_err().code(),
        400
    );
}

#[test]
fn health_checks_are_validated() {
    let mut v = Vip::new(id("10.0.0.1:0/tcp"));
    v.health = Some(Box::new(HealthCheck {
        kind: ProbeKind::Tcp,
        ..HealthCheck::default()
    }));
    let err = State::default().with_vip(v.clone()).unwrap_err();
    assert!(err.to_string().contains("health.port"), "{err}");
    v.health.as_mut().unwrap().port = Some(80);
    assert!(State::default().with_vip(v.clone()).is_ok());
    for (mutate, want) in [
        (
            Box::new(|h: &mut HealthCheck| h.timeout_ms = 5000) as Box<dyn Fn(&mut HealthCheck)>,
            "timeout_ms",
        ),
        (Box::new(|h: &mut HealthCheck| h.fall = 0), "fall"),
        (
            Box::new(|h: &mut HealthCheck| {
                h.kind = ProbeKind::Http;
                h.expect_status = "2xx".into()
            }),
            "expect_status",
        ),
        (
            Box::new(|h: &mut HealthCheck| {
                h.kind = ProbeKind::Http;
                h.path = "healthz".into()
            }),
            "path",
        ),
    ] {
        let mut w = v.clone();
        mutate(w.health.as_mut().unwrap());
        let err = State::default().with_vip(w).unwrap_err();
        assert!(err.to_string().contains(want), "{want}: {err}");
    }
    assert_eq!(
        parse_statuses("200,204, 300-399").unwrap(),
        [(200, 200), (204, 204), (300, 399)]
    );
}

#[test]
fn a_file_without_an_interface_keeps_the_attachment_in_validate_and_apply_alike() {
    // `validate` previews with the same `Change::Apply` that `apply` makes.
    let running = State::from_toml(EXAMPLE).unwrap();
    let file = State::from_toml("[[vip]]\naddress = \"10.200.0.1:80/tcp\"\n").unwrap();
    let after = Change::Apply(file).apply_to(&running).unwrap();
    assert_eq!(after.balancer.interface.as_deref(), Some("eth0"));
    let lines = running.diff(&after);
    assert!(!lines.iter().any(|l| l.contains("detach")), "{lines:?}");
}

#[test]
fn bgp_and_ipv6_vrrp_sections_are_checked() {
    let base = "[balancer]\ninterface = \"eth0\"\n";
    let ok = State::from_toml(&format!(
        "{base}[bgp]\nmin_live_backends = 2\n[vrrp]\nvrid = 52\naddresses = [\"fd10:2::100\"]\n"
    ))
    .unwrap();
    let b = ok.bgp.as_ref().unwrap();
    assert_eq!(
        (
            b.table,
            b.min_live_backends,
            b.withdraw_wait_ms,
            b.announce_hold_ms
        ),
        (4242, 2, 2000, 1000)
    );
    assert_eq!(State::from_toml(&ok.to_toml()).unwrap(), ok, "round trip");
    for (section, field) in [
        ("[bgp]\ntable = 254\n", "bgp.table"),
        ("[bgp]\nmin_live_backends = 0\n", "bgp.min_live_backends"),
        ("[bgp]\nwithdraw_wait_ms = 60001\n", "bgp.withdraw_wait_ms"),
        ("[bgp]\nannounce_hold_ms = 70000\n", "bgp.announce_hold_ms"),
        ("[bgp]\ninterface = \"a/b\"\n", "bgp.interface"),
        (
            "[vrrp]\nvrid = 5\naddresses = [\"10.0.0.100\", \"fd10:2::100\"]\n",
            "vrrp.addresses",
        ),
        (
            "[vrrp]\nvrid = 5\naddresses = [\"fe80::1\"]\n",
            "vrrp.addresses",
        ),
    ] {
        let e = State::from_toml(&format!("{base}{section}")).unwrap_err();
        assert!(e.to_string().starts_with(field), "{section}: {e}");
        assert_eq!(e.code(), 400);
    }
    let mut without = ok.clone();
    without.bgp = None;
    assert!(
        ok.diff(&without)
            .iter()
            .any(|l| l == "BGP announcements off"),
        "{:?}",
        ok.diff(&without)
    );
}

#[test]
fn probe_routes_and_adaptive_weights_round_trip_and_diff() {
    let text = r#"
[[vip]]
address = "10.200.0.1:80/tcp"
adaptive_weights = true

  [vip.health]
  kind = "tcp"
  via = "direct"

  [[vip.backend]]
  address = "10.10.3.11"
"#;
    let s = State::from_toml(text).unwrap();
    let v = &s.vips[0];
    assert!(v.adaptive_weights);
    assert_eq!(v.health.as_ref().unwrap().via, Some(ProbeVia::Direct));
    assert_eq!(State::from_toml(&s.to_toml()).unwrap(), s, "round trip");
    let e = State::from_toml(&text.replace("\"direct\"", "\"sideways\"")).unwrap_err();
    assert!(e.to_string().contains("via"), "{e}");
    // Unset: not written out (the agent chooses).
    let mut auto = s.clone();
    auto.vips[0].health.as_mut().unwrap().via = None;
    auto.vips[0].adaptive_weights = false;
    let t = auto.to_toml();
    assert!(!t.contains("via") && !t.contains("adaptive"), "{t}");
    let lines = s.diff(&auto);
    assert!(
        lines.contains(&"VIP 10.200.0.1:80/tcp: adaptive weights off".to_owned())
            && lines
                .contains(&"VIP 10.200.0.1:80/tcp: health check tcp via direct -> tcp".to_owned()),
        "{lines:?}"
    );
    let on = Change::SetAdaptiveWeights {
        vip: v.address,
        on: true,
    }
    .apply_to(&auto)
    .unwrap();
    assert!(on.vips[0].adaptive_weights);
    assert!(
        Change::SetAdaptiveWeights {
            vip: "10.200.0.9:80/tcp".parse().unwrap(),
            on: true,
        }
        .apply_to(&auto)
        .is_err()
    );
}
