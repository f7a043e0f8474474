//! The browser harness (`icr_lab::browser`): a real headless Chromium in a
//! network namespace, driven against a small site served on that
//! namespace's loopback. Needs root and Debian's chromium and chromium-driver.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use icr_lab::{TempDir, browser::Browser};

const NS_PREFIX: &str = "icrbrowse-";

/// A network namespace of this test's own with `lo` up, removed (and every
/// process in it killed) when dropped; those of dead runs removed first.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        for line in
            String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).lines()
        {
            let Some(name) = line.split_whitespace().next() else { continue };
            let Some(pid) = name.strip_prefix(NS_PREFIX) else { continue };
            if !Path::new("/proc").join(pid).exists() {
                remove_netns(name);
            }
        }
        let name = format!("{NS_PREFIX}{}", std::process::id());
        remove_netns(&name); // left by a killed run with the same pid
        run(Command::new("ip").args(["netns", "add", &name]));
        let netns = Netns(name);
        run(Command::new("ip").args(["-n", &netns.0, "link", "set", "lo", "up"]));
        netns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove_netns(&self.0);
    }
}

fn remove_netns(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: signalling a process inside this test's own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
}

fn run(command: &mut Command) {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The site: a page under a strict CSP (no scripts at all) with a form that
/// posts (answered after a pause, so that `click` must wait), a cookie set
/// HttpOnly and SameSite=Strict, and a file served as an attachment.
const SITE: &str = r#"
import http.server, sys, time, urllib.parse
DOWNLOAD = bytes(range(256)) * 1024 + b"end\n"
HEADERS = {"Content-Security-Policy": "default-src 'none'; form-action 'self'", "Cache-Control": "no-store"}
class Handler(http.server.BaseHTTPRequestHandler):
    def send(self, status, body, kind="text/html; charset=utf-8", extra=()):
        self.send_response(status)
        for key, value in list(HEADERS.items()) + list(extra):
            self.send_header(key, value)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/":
            page = """<!doctype html><html><head><title>Harness</title></head><body>
<h1>Harness</h1><ul><li>one</li><li>two</li><li>three</li></ul>
<form method="post" action="/submit">
<input id="name" name="name" value="placeholder">
<select id="colour" name="colour"><option value="red">Red</option><option value="green">Green</option></select>
<textarea id="note" name="note"></textarea>
<button id="send" type="submit">Send</button></form>
<a id="download" href="/export">Export</a></body></html>"""
            self.send(200, page.encode(), extra=[("Set-Cookie", "session=s3cret; Path=/; HttpOnly; SameSite=Strict")])
        elif self.path == "/export":
            self.send(200, DOWNLOAD, "application/octet-stream", [("Content-Disposition", 'attachment; filename="export.bin"')])
        else:
            self.send(404, b"not found")
    def do_POST(self):
        form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
        time.sleep(0.5)
        name, colour, note = (form.get(k, [""])[0] for k in ("name", "colour", "note"))
        cookie = self.headers.get("Cookie", "")
        self.send(200, f"""<!doctype html><html><head><title>Sent</title></head><body>
<p id="result">Hello {name}, {colour}: {note}</p><p id="cookie">{cookie}</p></body></html>""".encode())
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// The site's bytes of `/export`, as the script makes them.
fn download_bytes() -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..=255u8).cycle().take(256 * 1024).collect();
    bytes.extend_from_slice(b"end\n");
    bytes
}

struct Site(Child);

impl Site {
    /// Starts the site in `ns` and returns it with its port.
    fn start(ns: &str, dir: &Path) -> (Self, u16) {
        let script = dir.join("site.py");
        fs::write(&script, SITE).unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3"])
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the site");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| panic!("the site's port, not {line:?}"));
        (Site(child), port)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn chromium_drives_a_site_inside_a_network_namespace() {
    let started = Instant::now();
    let ns = Netns::new();
    let dir = TempDir::new("browser-harness");
    let (_site, port) = Site::start(&ns.0, dir.path());
    let base = format!("http://127.0.0.1:{port}");
    let downloads = dir.path().join("downloads");

    let browser = Browser::start(&ns.0, &downloads).expect("starting the browser");
    let up = started.elapsed();
    let version = browser.devtools("Browser.getVersion", serde_json::json!({})).unwrap();
    assert!(version["product"].as_str().unwrap_or_default().contains("Chrome/"), "{version}");
    browser.goto(&format!("{base}/")).unwrap();
    assert_eq!(browser.current_url().unwrap(), format!("{base}/"));
    assert_eq!(browser.text("h1").unwrap(), "Harness");
    assert_eq!(browser.texts("li").unwrap(), ["one", "two", "three"]);
    assert!(browser.exists("form").unwrap());
    assert!(!browser.exists("#missing").unwrap());
    assert!(browser.page_source().unwrap().contains(r#"<a id="download" href="/export">"#));

    // WebDriver's scripts run even where the page's CSP allows none; the
    // HttpOnly cookie is not visible to them.
    assert_eq!(browser.execute("return document.title").unwrap(), "Harness");
    assert_eq!(browser.execute("return document.cookie").unwrap(), "");
    let cookies = browser.cookies().unwrap();
    let session =
        cookies.iter().find(|c| c.name == "session").unwrap_or_else(|| panic!("no session cookie in {cookies:?}"));
    assert_eq!(session.value, "s3cret");
    assert!(session.http_only, "{session:?}");
    assert!(!session.secure, "{session:?}");
    assert_eq!(session.same_site.as_deref(), Some("Strict"), "{session:?}");

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-harness");
    let shot = shots.join("form.png");
    let before = SystemTime::now() - Duration::from_secs(1); // file times are coarse
    browser.screenshot(&shot).unwrap();
    assert!(fs::metadata(&shot).unwrap().modified().unwrap() >= before, "the screenshot is an old one");
    let png = fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 2_000, "a screenshot of {} bytes", png.len());

    // The form: the field is cleared before typing; the click waits for the
    // answer, which takes half a second.
    browser.fill("#name", "Ada Lovelace").unwrap();
    browser.select("#colour", "green").unwrap();
    browser.fill("#note", "a < b & c").unwrap();
    browser.click("#send").unwrap();
    assert_eq!(browser.current_url().unwrap(), format!("{base}/submit"));
    assert_eq!(browser.text("#result").unwrap(), "Hello Ada Lovelace, green: a < b & c");
    assert_eq!(browser.text("#cookie").unwrap(), "session=s3cret");
    browser.screenshot(&shots.join("result.png")).unwrap();

    // The download: complete, byte for byte; a second one is a new file.
    browser.goto(&format!("{base}/")).unwrap();
    browser.click("#download").unwrap();
    let file = browser.wait_for_download(".bin").unwrap();
    assert_eq!(file.file_name().unwrap(), "export.bin");
    assert!(fs::read(&file).unwrap() == download_bytes(), "the download differs from the served bytes");
    browser.click("#download").unwrap();
    let again = browser.wait_for_download(".bin").unwrap();
    assert_ne!(again, file);
    assert!(fs::read(&again).unwrap() == download_bytes());

    drop(browser);
    eprintln!("{} up in {up:?}, test done in {:?}", version["product"], started.elapsed());
    // Dropping the browser killed everything of it in the namespace.
    let pids = Command::new("ip").args(["netns", "pids", &ns.0]).output().unwrap();
    let left: Vec<String> = String::from_utf8_lossy(&pids.stdout)
        .split_whitespace()
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/comm")).ok())
        .map(|comm| comm.trim().to_string())
        .filter(|comm| comm != "python3")
        .collect();
    assert!(left.is_empty(), "left running in the namespace: {left:?}");
}
