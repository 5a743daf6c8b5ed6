//! A real headless browser for tests: Debian's chromium, inside a test's namespace, driven
//! over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages ended by a
//! NUL byte, commands on the browser's fd 3, answers and events on its fd 4). Unlike
//! `--dump-dom` with `--virtual-time-budget`, the page runs in real time, so its timers and
//! the rates it computes are what a person would see.
//!
//! The browser runs in a process group of its own, which is killed on drop.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::netns::Netns;

/// How long one DevTools command may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Browser {
    child: Child,
    to: ChildStdin,
    from: Receiver<Value>,
    next_id: u64,
    /// The page's DevTools session.
    session: Option<String>,
    _profile: PathBuf,
}

impl Browser {
    /// Starts chromium in `ns` with a fresh profile under `dir`, and a page of
    /// `width`x`height`.
    pub fn start(ns: &Netns, dir: &Path, width: u32, height: u32) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt as _;
        let profile = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile)?;
        let mut cmd = ns.command("sh")?;
        // fd 3 <- our commands (its stdin), fd 4 -> its answers (its stdout); chromium's
        // own stdin and stdout go nowhere.
        cmd.args([
            "-c",
            "exec \"$0\" \"$@\" 3<&0 4>&1 0</dev/null 1>/dev/null",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            "--no-proxy-server",
            "--hide-scrollbars",
            "--remote-debugging-pipe",
            &format!("--window-size={width},{height}"),
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(
            dir.join("chromium.log"),
        )?));
        let mut child = cmd.spawn().context("starting chromium (Debian package)")?;
        let to = child.stdin.take().expect("piped");
        let out = child.stdout.take().expect("piped");
        let (tx, from) = channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            while r.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                    && tx.send(v).is_err()
                {
                    return;
                }
                buf.clear();
            }
        });
        Ok(Self {
            child,
            to,
            from,
            next_id: 0,
            session: None,
            _profile: profile,
        })
    }

    /// Sends a DevTools command (to the page's session once there is one, unless `browser`)
    /// and returns its result.
    fn call_in(
        &mut self,
        session: Option<String>,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(0);
        self.to
            .write_all(&bytes)
            .with_context(|| format!("sending {method} to chromium"))?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from.recv_timeout(left) {
                Ok(v) if v["id"].as_u64() == Some(id) => {
                    if let Some(e) = v.get("error") {
                        bail!("{method}: {e}");
                    }
                    return Ok(v["result"].clone());
                }
                Ok(_) => {} // an event, or an answer to another call
                Err(RecvTimeoutError::Timeout) => bail!("{method}: no answer in {CALL_TIMEOUT:?}"),
                Err(RecvTimeoutError::Disconnected) => bail!("{method}: chromium exited"),
            }
        }
    }

    fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let s = self.session.clone();
        self.call_in(s, method, params)
    }

    /// Opens `url` in a new page, which later calls address.
    pub fn open(&mut self, url: &str) -> anyhow::Result<()> {
        let t = self.call_in(None, "Target.createTarget", json!({ "url": "about:blank" }))?;
        let target = t["targetId"].as_str().context("no targetId")?.to_owned();
        let a = self.call_in(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target, "flatten": true }),
        )?;
        self.session = Some(a["sessionId"].as_str().context("no sessionId")?.to_owned());
        let nav = self.call("Page.navigate", json!({ "url": url }))?;
        if let Some(e) = nav.get("errorText") {
            bail!("opening {url}: {e}");
        }
        Ok(())
    }

    /// The value of a JavaScript expression in the page (JSON-serialisable values only).
    pub fn eval(&mut self, expr: &str) -> anyhow::Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true }),
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{expr}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Writes a PNG of the page to `path`.
    pub fn screenshot(&mut self, path: &Path) -> anyhow::Result<()> {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" }))?;
        let data = r["data"].as_str().context("no screenshot data")?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        std::fs::write(path, png)?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.call_in(None, "Browser.close", json!({}));
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The whole group: renderer, zygote and utility processes included.
        if let Some(pgid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
        let _ = self.child.wait();
    }
}
