//! Where in a state file a problem is: its line and the field (as a path such as
//! `state.vip[0].ring_size`), for the message of an agent that refuses to start. Pure.

/// One step of a path: a key of an object, or an index into an array.
#[derive(Clone, Debug)]
enum Step {
    Key(Option<String>, bool),
    Index(usize),
}

fn render(stack: &[Step]) -> String {
    let mut out = String::new();
    for s in stack {
        match s {
            Step::Key(Some(k), _) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Step::Key(None, _) => {}
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Every key of `text` (JSON) with its path, its line (1-based), and its value when the
/// value is a string; and the path at byte `stop` (where the walk ends).
fn walk(text: &str, stop: usize) -> (Vec<(String, usize, Option<String>)>, String) {
    let bytes = text.as_bytes();
    let mut keys = Vec::new();
    let mut stack: Vec<Step> = Vec::new();
    let (mut i, mut line) = (0usize, 1usize);
    // The key whose value comes next (for recording string values).
    let mut value_of: Option<usize> = None;
    while i < bytes.len() && i < stop {
        match bytes[i] {
            b'\n' => line += 1,
            b'{' => {
                stack.push(Step::Key(None, true));
                value_of = None;
            }
            b'[' => {
                stack.push(Step::Index(0));
                value_of = None;
            }
            b'}' | b']' => {
                stack.pop();
            }
            b',' => match stack.last_mut() {
                Some(Step::Index(n)) => *n += 1,
                Some(Step::Key(_, expecting)) => *expecting = true,
                None => {}
            },
            b':' => {
                if let Some(Step::Key(_, expecting)) = stack.last_mut() {
                    *expecting = false;
                }
            }
            b'"' => {
                let start = i + 1;
                let mut j = start;
                while j < bytes.len() && bytes[j] != b'"' {
                    j += if bytes[j] == b'\\' { 2 } else { 1 };
                }
                let s = text.get(start..j.min(bytes.len())).unwrap_or("").to_owned();
                match stack.last_mut() {
                    Some(Step::Key(k, true)) => {
                        *k = Some(s);
                        keys.push((render(&stack), line, None));
                        value_of = Some(keys.len() - 1);
                    }
                    _ => {
                        if let Some(k) = value_of.take() {
                            keys[k].2 = Some(s);
                        }
                    }
                }
                i = j;
            }
            _ => {}
        }
        i += 1;
    }
    (keys, render(&stack))
}

/// The byte offset of (1-based) `line` and `column` in `text`.
fn offset(text: &str, line: usize, column: usize) -> usize {
    let start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    (start + column).min(text.len())
}

/// The path of the field at `line` and `column` (as serde_json reports an error).
pub fn field_at(text: &str, line: usize, column: usize) -> String {
    walk(text, offset(text, line, column)).1
}

/// The line and path of the field a validation message names (it starts with the field:
/// `vip[0] 10.0.0.1:80/tcp: backend 10.1.0.1: health.port: ...`, `balancer.mtu: ...`);
/// `root` is the path of the state in the file (`state`, or empty for a bare state). The
/// deepest part of it that the file has is what is found.
pub fn locate(text: &str, root: &str, message: &str) -> Option<(usize, String)> {
    let (keys, _) = walk(text, usize::MAX);
    let find = |path: &str| keys.iter().find(|(p, _, _)| p == path);
    let join = |a: &str, b: &str| {
        if a.is_empty() {
            b.to_owned()
        } else if b.starts_with('[') {
            format!("{a}{b}")
        } else {
            format!("{a}.{b}")
        }
    };
    // The first word of a rest: "ring_size: ..." -> ring_size; "weight 9 is ..." -> weight.
    let word = |rest: &str| -> String {
        rest.split([':', ' '])
            .next()
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    let mut best: Option<(usize, String)> = None;
    let mut at = root.to_owned();
    let mut rest = message;
    if let Some(r) = message.strip_prefix("vip[")
        && let Some((n, r)) = r.split_once(']')
        && let Ok(n) = n.parse::<usize>()
    {
        at = join(root, &format!("vip[{n}]"));
        // The VIP's line is that of its address.
        if let Some((_, l, _)) = find(&join(&at, "address")) {
            best = Some((*l, at.clone()));
        }
        rest = r.split_once(": ").map_or("", |x| x.1);
        if let Some(r) = rest.strip_prefix("backend ")
            && let Some((addr, r)) = r.split_once(": ")
        {
            let prefix = join(&at, "backend[");
            let hit = keys.iter().find(|(p, _, v)| {
                p.starts_with(&prefix) && p.ends_with("].address") && v.as_deref() == Some(addr)
            });
            if let Some((p, l, _)) = hit {
                at = p.trim_end_matches(".address").to_owned();
                best = Some((*l, at.clone()));
            }
            rest = r;
        }
    }
    // The field itself: as deep as the file goes (health.port, pools.blue, ring_size).
    let field = word(rest);
    let mut path = at.clone();
    for part in field.split('.').filter(|p| !p.is_empty()) {
        path = join(&path, part);
        match find(&path) {
            Some((_, l, _)) => best = Some((*l, path.clone())),
            None => break,
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"{
  "seq": 4,
  "state": {
    "version": 1,
    "vip": [
      {
        "address": "10.0.0.1:80/tcp",
        "ring_size": 4,
        "backend": [
          {
            "address": "10.1.0.1",
            "weight": 99999
          },
          {
            "address": "10.1.0.2",
            "health": {
              "kind": "tcp",
              "port": 0
            }
          }
        ]
      }
    ]
  }
}"#;

    #[test]
    fn the_path_at_a_position() {
        // serde_json reports `"ring_size": 4` at the value.
        assert_eq!(field_at(FILE, 8, 22), "state.vip[0].ring_size");
        assert_eq!(field_at(FILE, 12, 21), "state.vip[0].backend[0].weight");
        assert_eq!(field_at(FILE, 2, 10), "seq");
        assert_eq!(field_at("{\n  \"vip\": 3\n}", 2, 11), "vip");
    }

    #[test]
    fn the_line_of_a_validation_message() {
        let r = |m: &str| locate(FILE, "state", m);
        assert_eq!(
            r("vip[0] 10.0.0.1:80/tcp: ring_size: 4 must be a prime"),
            Some((8, "state.vip[0].ring_size".into()))
        );
        assert_eq!(
            r("vip[0] 10.0.0.1:80/tcp: backend 10.1.0.1: weight 99999 is out of range"),
            Some((12, "state.vip[0].backend[0].weight".into()))
        );
        assert_eq!(
            r("vip[0] 10.0.0.1:80/tcp: backend 10.1.0.2: health.port: the VIP takes"),
            Some((18, "state.vip[0].backend[1].health.port".into()))
        );
        // A field the file does not spell out: the deepest part that it does.
        assert_eq!(
            r("vip[0] 10.0.0.1:80/tcp: backend 10.1.0.2: listed twice"),
            Some((15, "state.vip[0].backend[1]".into()))
        );
        assert_eq!(
            r("version: unsupported version 2"),
            Some((4, "state.version".into()))
        );
        assert_eq!(r("balancer.mtu: 9 is out of range"), None);
    }
}
