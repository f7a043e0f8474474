//! A real headless Chromium, driven over WebDriver, inside a network
//! namespace: for tests of a web page served on that namespace's loopback
//! (the console on the lab's gateway).
//!
//! chromedriver is started with `ip netns exec`, so it and the Chromium it
//! launches live in the namespace. The WebDriver client (fantoccini) runs on
//! a thread of its own that has joined the namespace (`setns`) and drives a
//! current-thread tokio runtime: every socket it opens, so every request to
//! chromedriver on the namespace's 127.0.0.1, is made in the namespace. The
//! test talks to that thread through [`Browser`]'s blocking methods.
//!
//! Everything is bounded in time ([`LIMIT`], scaled by [`crate::patience`])
//! and cleaned up when the `Browser` is dropped, also when a test panics: the
//! WebDriver session is closed, chromedriver and every process of the
//! browser's profile are killed, the profile removed.
//!
//! Nothing here injects scripts into pages beyond WebDriver's own `execute`
//! (which a page's Content-Security-Policy does not restrict).

use std::{
    collections::HashSet,
    fs,
    future::Future,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    pin::Pin,
    process::{Child, Command, Stdio},
    sync::{Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use fantoccini::{Client, ClientBuilder, Locator, wd::WebDriverCompatibleCommand};
use serde_json::{Value, json};

use crate::{TempDir, patience};

/// The longest any one browser operation (a page load, a wait) may take,
/// before [`crate::patience`]'s scaling.
pub const LIMIT: Duration = Duration::from_secs(30);

/// How long a click's page must stay, loaded, for the click to be taken as
/// one that navigates nowhere (before [`crate::patience`]'s scaling).
pub const SETTLE: Duration = Duration::from_millis(500);

/// The Chromium binary itself: Debian's `/usr/bin/chromium` is a shell
/// wrapper that adds flags of its own.
const CHROMIUM: &str = "/usr/lib/chromium/chromium";

/// A cookie as the browser holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cookie {
    pub name: String,
    pub value: String,
    pub path: Option<String>,
    pub http_only: bool,
    pub secure: bool,
    /// `Strict`, `Lax` or `None`, as the browser reports it (if it does).
    pub same_site: Option<String>,
}

/// Work for the browser's thread: given the client, a future it runs to the end.
type Job = Box<dyn FnOnce(Client) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// A headless Chromium in a network namespace, and its WebDriver session.
pub struct Browser {
    ns: String,
    downloads: PathBuf,
    /// Downloads already handed out by [`Browser::wait_for_download`].
    taken: Mutex<HashSet<PathBuf>>,
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    driver: Option<Child>,
    /// The browser's profile (`--user-data-dir`) and chromedriver's log.
    dir: TempDir,
}

impl Browser {
    /// Starts Chromium (headless, 1280x900, a fresh profile) in network
    /// namespace `ns` (a name under /run/netns), its downloads going to
    /// `downloads` without asking.
    pub fn start(ns: &str, downloads: &Path) -> Result<Self> {
        let netns = Path::new("/run/netns").join(ns);
        let netns = fs::File::open(&netns).with_context(|| format!("opening network namespace {}", netns.display()))?;
        fs::create_dir_all(downloads).with_context(|| format!("creating {}", downloads.display()))?;
        let downloads = downloads.canonicalize()?;
        let mut browser = Browser {
            ns: ns.to_string(),
            downloads,
            taken: Mutex::new(HashSet::new()),
            jobs: None,
            worker: None,
            driver: None,
            dir: TempDir::new("icr-browser"),
        };
        // From here on, a failure drops `browser`, which kills what was started.
        let port = browser.start_driver()?;
        browser.start_session(netns, port)?;
        Ok(browser)
    }

    /// The namespace the browser runs in.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The directory downloads go to.
    pub fn downloads(&self) -> &Path {
        &self.downloads
    }

    /// Starts chromedriver in the namespace on a port of its choosing, in a
    /// process group of its own (with the browser it starts), and returns the port.
    fn start_driver(&mut self) -> Result<u16> {
        let log = self.dir.path().join("chromedriver.log");
        let mut driver = Command::new("ip")
            .args(["netns", "exec", &self.ns, "chromedriver", "--port=0"])
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(self.dir.path().join("chromedriver.stderr"))?)
            .process_group(0)
            .spawn()
            .context("starting chromedriver (Debian package chromium-driver)")?;
        let stdout = driver.stdout.take().expect("piped");
        self.driver = Some(driver);
        // "ChromeDriver was started successfully on port 37581."
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let port = line
                    .split("started successfully on port ")
                    .nth(1)
                    .and_then(|p| p.trim_end_matches('.').trim().parse::<u16>().ok());
                if let Some(port) = port
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(port);
                }
                // Read on to the end: chromedriver must never block on its stdout.
            }
        });
        rx.recv_timeout(patience(LIMIT)).map_err(|error| {
            let stderr = tail(&self.dir.path().join("chromedriver.stderr"));
            match error {
                mpsc::RecvTimeoutError::Timeout => anyhow!("chromedriver did not start within {:?}", patience(LIMIT)),
                mpsc::RecvTimeoutError::Disconnected => anyhow!("chromedriver exited"),
            }
            .context(format!("chromedriver's log: {}\n{stderr}", tail(&log)))
        })
    }

    /// Starts the browser's thread in the namespace and the WebDriver session.
    fn start_session(&mut self, netns: fs::File, port: u16) -> Result<()> {
        let capabilities = self.capabilities();
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel::<Result<()>>();
        let worker = std::thread::Builder::new().name(format!("browser-{}", self.ns)).spawn(move || {
            let started = (|| -> Result<(tokio::runtime::Runtime, Client)> {
                icr_test_kit::netns::enter_file(&netns).context("entering the browser's network namespace")?;
                drop(netns);
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                let mut builder = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
                builder.capabilities(capabilities);
                let limit = patience(LIMIT) * 2;
                let client = runtime
                    .block_on(async {
                        tokio::time::timeout(limit, builder.connect(&format!("http://127.0.0.1:{port}"))).await
                    })
                    .map_err(|_| anyhow!("timed out after {limit:?}"))?
                    .context("starting a WebDriver session")?;
                Ok((runtime, client))
            })();
            let (runtime, client) = match started {
                Ok(started) => started,
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            while let Ok(job) = inbox.recv() {
                runtime.block_on(job(client.clone()));
            }
            // The Browser is being dropped: end the session (Chromium exits).
            let _ = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(5), client.close()).await });
        })?;
        self.worker = Some(worker);
        // A session start launches Chromium: allow it twice the usual limit.
        match ready.recv_timeout(patience(LIMIT) * 2) {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error.context(format!("chromedriver's log: {}", tail(&self.log())))),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!(
                    "no WebDriver session within {:?}; chromedriver's log: {}",
                    patience(LIMIT) * 2,
                    tail(&self.log())
                )
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the browser's thread failed; chromedriver's log: {}", tail(&self.log()))
            }
        }
        self.jobs = Some(jobs);
        Ok(())
    }

    fn capabilities(&self) -> serde_json::Map<String, Value> {
        let profile = self.dir.path().join("profile");
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(), // as root
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1280,900".into(),
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--password-store=basic".into(),
            format!("--user-data-dir={}", profile.display()),
        ];
        // Downloads: chromedriver passes the directory on to headless
        // Chromium itself (Page.setDownloadBehavior); setting that behaviour
        // ourselves would overwrite a second `a.csv` rather than save `a (1).csv`.
        let mut options = json!({
            "args": args,
            "prefs": {
                "download.default_directory": self.downloads.display().to_string(),
                "download.prompt_for_download": false,
                "download.directory_upgrade": true,
                "safebrowsing.enabled": false,
            },
        });
        if Path::new(CHROMIUM).exists() {
            options["binary"] = json!(CHROMIUM);
        }
        let limit = patience(LIMIT).as_millis() as u64;
        let capabilities = json!({
            "browserName": "chrome",
            "pageLoadStrategy": "normal",
            "timeouts": {"pageLoad": limit, "script": limit, "implicit": 0},
            "goog:chromeOptions": options,
        });
        match capabilities {
            Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("chromedriver.log")
    }

    /// Runs `work` on the browser's thread and waits for its result: within
    /// [`LIMIT`] and a little (the waits inside `work`, of [`LIMIT`], say
    /// better what did not come).
    fn call<T, F, Fut>(&self, what: &str, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + 'static,
    {
        let limit = patience(LIMIT) + Duration::from_secs(5);
        let jobs = self.jobs.as_ref().ok_or_else(|| anyhow!("the browser has no session"))?;
        let (tx, rx) = mpsc::channel();
        let what_owned = what.to_string();
        let job: Job = Box::new(move |client| {
            Box::pin(async move {
                let result = match tokio::time::timeout(limit, work(client)).await {
                    Ok(result) => result,
                    Err(_) => Err(anyhow!("timed out after {limit:?}")),
                };
                let _ = tx.send(result.with_context(|| what_owned));
            })
        });
        jobs.send(job).map_err(|_| anyhow!("{what}: the browser's thread has ended"))?;
        // The job bounds itself; this only guards against a thread that hangs.
        rx.recv_timeout(limit + Duration::from_secs(10)).map_err(|_| anyhow!("{what}: the browser did not answer"))?
    }

    /// Loads `url` and waits for it to load.
    pub fn goto(&self, url: &str) -> Result<()> {
        let url = url.to_string();
        self.call(&format!("loading {url}"), move |client| async move {
            client.goto(&url).await?;
            wait_until_loaded(&client).await
        })
    }

    pub fn current_url(&self) -> Result<String> {
        self.call("reading the URL", |client| async move { Ok(client.current_url().await?.to_string()) })
    }

    /// Clears the input or textarea `css` (waiting for it to appear) and types `text` into it.
    pub fn fill(&self, css: &str, text: &str) -> Result<()> {
        let (css, text) = (css.to_string(), text.to_string());
        self.call(&format!("filling {css}"), move |client| async move {
            let element = find(&client, &css).await?;
            element.clear().await?;
            element.send_keys(&text).await?;
            Ok(())
        })
    }

    /// Chooses the option of value `value` of the `<select>` `css`.
    pub fn select(&self, css: &str, value: &str) -> Result<()> {
        let (css, value) = (css.to_string(), value.to_string());
        self.call(&format!("selecting {value} in {css}"), move |client| async move {
            find(&client, &css).await?.select_by_value(&value).await?;
            Ok(())
        })
    }

    /// Clicks the element `css` (waiting for it to appear), then waits for
    /// the page it leads to, if any, to load: a link, a form's submission.
    /// A click that does not navigate (a download, a script's change to the
    /// page: [`Browser::wait_for`] what it shows) returns after [`SETTLE`].
    pub fn click(&self, css: &str) -> Result<()> {
        let css = css.to_string();
        self.call(&format!("clicking {css}"), move |client| async move {
            let element = find(&client, &css).await?;
            // Marks this document, to tell it from the next one.
            client.execute("window.__icrBrowserOld = true", Vec::new()).await?;
            element.click().await?;
            wait_after_click(&client).await
        })
    }

    /// The visible text of the element `css` (waiting for it to appear).
    pub fn text(&self, css: &str) -> Result<String> {
        let css = css.to_string();
        self.call(&format!("reading the text of {css}"), move |client| async move {
            Ok(find(&client, &css).await?.text().await?)
        })
    }

    /// The visible texts of every element `css`, in document order (none: empty).
    pub fn texts(&self, css: &str) -> Result<Vec<String>> {
        let css = css.to_string();
        self.call(&format!("reading the texts of {css}"), move |client| async move {
            let mut texts = Vec::new();
            for element in client.find_all(Locator::Css(&css)).await? {
                texts.push(element.text().await?);
            }
            Ok(texts)
        })
    }

    /// Whether an element `css` is on the page now (no waiting).
    pub fn exists(&self, css: &str) -> Result<bool> {
        let css = css.to_string();
        self.call(&format!("looking for {css}"), move |client| async move {
            Ok(!client.find_all(Locator::Css(&css)).await?.is_empty())
        })
    }

    /// Waits (within [`LIMIT`]) for an element `css` to appear.
    pub fn wait_for(&self, css: &str) -> Result<()> {
        let css = css.to_string();
        self.call(&format!("waiting for {css}"), move |client| async move { find(&client, &css).await.map(drop) })
    }

    /// The current page's HTML, as the browser now has it.
    pub fn page_source(&self) -> Result<String> {
        self.call("reading the page source", |client| async move { Ok(client.source().await?) })
    }

    /// Saves a PNG screenshot of the viewport to `path` (its directory made
    /// if missing), replacing any file there at once.
    pub fn screenshot(&self, path: &Path) -> Result<()> {
        let png = self.call("taking a screenshot", |client| async move { Ok(client.screenshot().await?) })?;
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        // Whole or not at all, for whoever reads it (another run's test too).
        let partial = path.with_extension(format!("{}.partial", std::process::id()));
        fs::write(&partial, png).with_context(|| format!("writing {}", partial.display()))?;
        fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))
    }

    /// The cookies the browser holds for the current page.
    pub fn cookies(&self) -> Result<Vec<Cookie>> {
        self.call("reading cookies", |client| async move {
            Ok(client
                .get_all_cookies()
                .await?
                .into_iter()
                .map(|c| Cookie {
                    name: c.name().to_string(),
                    value: c.value().to_string(),
                    path: c.path().map(str::to_string),
                    http_only: c.http_only().unwrap_or(false),
                    secure: c.secure().unwrap_or(false),
                    same_site: c.same_site().map(|s| s.to_string()),
                })
                .collect())
        })
    }

    /// Runs `js` (a function body: `return ...` gives a value) in the page,
    /// through WebDriver (not subject to the page's CSP).
    pub fn execute(&self, js: &str) -> Result<Value> {
        let js = js.to_string();
        self.call("running a script", move |client| async move { Ok(client.execute(&js, Vec::new()).await?) })
    }

    /// Sends the Chrome DevTools Protocol command `cmd` (`"Browser.getVersion"`)
    /// to the current page, through chromedriver, and returns its result.
    pub fn devtools(&self, cmd: &str, params: Value) -> Result<Value> {
        let cmd = cmd.to_string();
        self.call(&format!("sending {cmd}"), move |client| async move {
            Ok(client.issue_cmd(ChromiumCommand { cmd, params }).await?)
        })
    }

    /// Waits (within [`LIMIT`]) for a complete download whose name ends with
    /// `name_suffix`, one this call has not returned before (a second
    /// download of `a.csv` is Chromium's `a (1).csv`), and returns its path.
    pub fn wait_for_download(&self, name_suffix: &str) -> Result<PathBuf> {
        let limit = patience(LIMIT);
        let started = Instant::now();
        let mut last: Option<(PathBuf, u64)> = None;
        loop {
            let mut partial = false;
            let mut found = None;
            for entry in fs::read_dir(&self.downloads)?.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".crdownload") {
                    partial = true;
                } else if name.ends_with(name_suffix) && !self.taken.lock().unwrap().contains(&entry.path()) {
                    found = Some((entry.path(), entry.metadata()?.len()));
                }
            }
            // Complete: Chromium has renamed it from .crdownload, no download
            // is in flight, and its size held still for one look.
            if let Some(found) = found.filter(|_| !partial) {
                if last.as_ref() == Some(&found) {
                    self.taken.lock().unwrap().insert(found.0.clone());
                    return Ok(found.0);
                }
                last = Some(found);
            } else {
                last = None;
            }
            if started.elapsed() > limit {
                let present: Vec<String> = fs::read_dir(&self.downloads)?
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                bail!(
                    "no complete download *{name_suffix} in {} after {limit:?} (present: {present:?})",
                    self.downloads.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closing the channel ends the thread, which first ends the session.
        drop(self.jobs.take());
        if let Some(worker) = self.worker.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !worker.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if worker.is_finished() {
                let _ = worker.join();
            }
        }
        if let Some(mut driver) = self.driver.take() {
            // SAFETY: signalling the process group chromedriver leads (its own, from `process_group(0)`).
            unsafe { libc::kill(-(driver.id() as i32), libc::SIGKILL) };
            let _ = driver.wait();
        }
        // Anything of the profile that left the group (Chromium's helpers).
        kill_processes_mentioning(&self.dir.path().join("profile"));
        // `dir` (the profile) is removed as it drops.
    }
}

/// The element `css`, waited for within [`LIMIT`].
async fn find(client: &Client, css: &str) -> Result<fantoccini::elements::Element> {
    client
        .wait()
        .at_most(patience(LIMIT))
        .every(Duration::from_millis(50))
        .for_element(Locator::Css(css))
        .await
        .with_context(|| format!("no element {css}"))
}

/// Waits for the current document to have loaded (`readyState` complete);
/// a script failing while a navigation swaps documents is tried again.
/// Chromium's error page (see [`error_page`]) is an error.
async fn wait_until_loaded(client: &Client) -> Result<()> {
    let limit = Instant::now() + patience(LIMIT);
    loop {
        if Instant::now() > limit {
            bail!("the page did not finish loading within {:?}", patience(LIMIT));
        }
        if let Ok(state) =
            client.execute("return [document.readyState, document.URL, document.title]", Vec::new()).await
            && state[0] == "complete"
        {
            return error_page(&state[1], &state[2]);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After a click: a new document (the mark [`Browser::click`] set is gone)
/// that has loaded, or the old document still there and loaded for
/// [`SETTLE`]. A navigation may begin a little after chromedriver's click
/// has returned (a form's submission is a task of its own), but once it has
/// begun chromedriver holds every script until it has ended.
async fn wait_after_click(client: &Client) -> Result<()> {
    let started = Instant::now();
    let mut quiet_since = Instant::now();
    loop {
        if started.elapsed() > patience(LIMIT) {
            bail!("no page loaded within {:?} of the click", patience(LIMIT));
        }
        let state = client
            .execute(
                "return [window.__icrBrowserOld === true, document.readyState, document.URL, document.title]",
                Vec::new(),
            )
            .await
            .unwrap_or_default(); // a script failing while documents swap: look again
        let (old, complete) = (state[0] == true, state[1] == "complete");
        if !old && complete {
            return error_page(&state[2], &state[3]);
        }
        if !(old && complete) {
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= patience(SETTLE) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Chromium's own page for an unreachable server: WebDriver reports no
/// error, and gives the URL that was asked for.
fn error_page(url: &Value, title: &Value) -> Result<()> {
    if url.as_str().is_some_and(|url| url.starts_with("chrome-error:")) {
        bail!("the browser shows its error page ({title})");
    }
    Ok(())
}

/// A Chrome DevTools Protocol command, through chromedriver's
/// `/session/{id}/chromium/send_command_and_get_result`.
#[derive(Debug)]
struct ChromiumCommand {
    cmd: String,
    params: Value,
}

impl WebDriverCompatibleCommand for ChromiumCommand {
    fn endpoint(&self, base_url: &url::Url, session_id: Option<&str>) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!("session/{}/chromium/send_command_and_get_result", session_id.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(json!({"cmd": self.cmd, "params": self.params}).to_string()))
    }
}

/// SIGKILLs every process whose command line mentions `path`.
fn kill_processes_mentioning(path: &Path) {
    let needle = path.display().to_string();
    let Ok(entries) = fs::read_dir("/proc") else { return };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if pid == std::process::id() as i32 {
            continue;
        }
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            // SAFETY: a process of this browser's own profile.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The end of a log, for an error message.
fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
