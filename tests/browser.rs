//! The web console in a real browser: Debian's headless Chromium driven through WebDriver
//! (chromium-driver) against a real `keel serve` over TLS with real probe guests. Sign in,
//! the empty state, define and start a VM, its console (type, read the guest's answer), shut
//! it down, a VMM killed behind the daemon's back showing up as an incident without a
//! reload, acknowledged there; a viewer sees no action; what a caller wrote is shown as text;
//! no serious or critical accessibility violation (axe-core). Prints the front page's first
//! paint and bytes (docs/benchmarks.md). With KEEL_SCREENSHOTS=DIR it saves screenshots there
//! (docs/screenshots holds the committed ones).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{free_port, Daemon};
use common::{kvm_available, probe_elf};
use fantoccini::{Client, Locator};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

/// The page's first contentful paint (ms from navigation start) and bytes transferred
/// (compressed, the page and every file it loaded), from the browser's timing API.
const TIMING: &str = "const paint = performance.getEntriesByType('paint').find(p => p.name === 'first-contentful-paint');
     const nav = performance.getEntriesByType('navigation')[0];
     const resources = performance.getEntriesByType('resource');
     return { first_paint_ms: paint ? Math.round(paint.startTime) : null,
              bytes: resources.reduce((n, r) => n + r.transferSize, nav.transferSize),
              decoded_bytes: resources.reduce((n, r) => n + r.decodedBodySize, nav.decodedBodySize) };";

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromedriver is needed for the browser tests: apt install chromium chromium-driver (scripts/install-deps.sh does)",
            );
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), json!("chrome"));
    // The daemon's self-signed certificate (its fingerprint is what operators check).
    caps.insert("acceptInsecureCerts".into(), json!(true));
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", "--lang=en-US"]
        }),
    );
    fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session")
}

/// Waits until the page's text contains `what`, without reloading it.
async fn wait_text(c: &Client, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = c
            .find(Locator::Css("body"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains(what) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed '{what}'; it shows:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until an element matching `css` is on the page.
async fn shown(c: &Client, css: &str) {
    if let Err(e) = c.wait().at_most(WAIT).for_element(Locator::Css(css)).await {
        let text = match c.find(Locator::Css("body")).await {
            Ok(body) => body.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        panic!("nothing matches '{css}': {e}; the page shows:\n{text}");
    }
}

async fn sign_in(c: &Client, base: &str, token: &str) {
    c.goto(base).await.unwrap();
    let field = c.wait().for_element(Locator::Id("token")).await.unwrap();
    field.send_keys(token).await.unwrap();
    c.find(Locator::Css("form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(c, "Sign out").await;
}

async fn sign_out(c: &Client) {
    c.find(Locator::XPath("//button[text()='Sign out']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait().for_element(Locator::Id("token")).await.unwrap();
}

async fn screenshot(c: &Client, name: &str) {
    if let Some(dir) = std::env::var_os("KEEL_SCREENSHOTS") {
        let png = c.screenshot().await.unwrap();
        let path = std::path::Path::new(&dir).join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }
}

/// Serious or critical axe-core violations on the page shown.
async fn accessibility_problems(c: &Client) -> Vec<serde_json::Value> {
    let axe = std::fs::read_to_string(
        common::workspace_root().join("web/node_modules/axe-core/axe.min.js"),
    )
    .expect("web/node_modules/axe-core (scripts/build-console.sh installs it)");
    c.execute(&axe, vec![]).await.unwrap();
    let found = c
        .execute_async(
            "const done = arguments[arguments.length - 1];
             axe.run(document, { resultTypes: ['violations'] }).then(r => done(r.violations.map(v =>
               ({ id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(n => n.html) }))));",
            vec![],
        )
        .await
        .unwrap();
    found
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["impact"] == "serious" || v["impact"] == "critical")
        .cloned()
        .collect()
}

/// Tabs from the top of the page until the button labelled `label` has the focus, then
/// presses Enter: the page works with the keyboard alone.
async fn press_with_keyboard(c: &Client, label: &str) {
    use fantoccini::actions::{InputSource, KeyAction, KeyActions};
    use fantoccini::key::Key;
    let press = |key: Key| {
        KeyActions::new("keyboard".into())
            .then(KeyAction::Down { value: key.into() })
            .then(KeyAction::Up { value: key.into() })
    };
    c.execute(
        "document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0);",
        vec![],
    )
    .await
    .unwrap();
    for _ in 0..100 {
        c.perform_actions(press(Key::Tab)).await.unwrap();
        let focused = c
            .execute(
                "return document.activeElement.getAttribute('aria-label');",
                vec![],
            )
            .await
            .unwrap();
        if focused == json!(label) {
            c.perform_actions(press(Key::Enter)).await.unwrap();
            return;
        }
    }
    panic!("'{label}' cannot be reached with Tab");
}

async fn click_button(c: &Client, label: &str) {
    c.find(Locator::Css(&format!("button[aria-label='{label}']")))
        .await
        .unwrap_or_else(|_| panic!("no button '{label}'"))
        .click()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_a_vm_end_to_end_in_the_browser() {
    if !kvm_available("an_operator_runs_a_vm_end_to_end_in_the_browser") {
        return;
    }
    let listen = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start_with("browser", &[], &["--listen", &listen], &[]);
    let base = format!("https://{listen}/");
    let operator = daemon
        .ok(&["token", "create", "ops", "--role", "operator"])
        .trim()
        .to_string();
    let viewer = daemon
        .ok(&["token", "create", "watch", "--role", "viewer"])
        .trim()
        .to_string();
    let images = daemon.images();
    std::fs::create_dir_all(&images).unwrap();
    let kernel = images.join("probe.elf");
    std::fs::copy(probe_elf(), &kernel).unwrap();
    let driver = Driver::start();
    let c = browser(&driver).await;

    // Sign in; the empty state says all is well.
    sign_in(&c, &base, &operator).await;
    wait_text(&c, "All is well").await;
    wait_text(&c, "No VM is defined yet").await;
    let timing = c.execute(TIMING, vec![]).await.unwrap();
    eprintln!("browser: first visit (redirect, TLS, sign-in page): {timing}");
    // The front page loaded again, signed in (the browser has the files cached as it would).
    let mut reloads = Vec::new();
    for _ in 0..5 {
        c.refresh().await.unwrap();
        wait_text(&c, "All is well").await;
        reloads.push(c.execute(TIMING, vec![]).await.unwrap());
    }
    eprintln!("browser: front page signed in, reloaded: {reloads:?}");
    let problems = accessibility_problems(&c).await;
    assert!(
        problems.is_empty(),
        "axe-core on the front page: {problems:#?}"
    );
    screenshot(&c, "front-page-empty").await;

    // A definition the API refuses shows the API's sentence, as text: the path holds markup.
    let form = c.find(Locator::Css("form.create")).await.unwrap();
    form.find(Locator::Css("input[name=name]"))
        .await
        .unwrap()
        .send_keys("bad")
        .await
        .unwrap();
    form.find(Locator::Css("input[name=kernel]"))
        .await
        .unwrap()
        .send_keys("/etc/<script>window.pwned=1</script>")
        .await
        .unwrap();
    form.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&c, "<script>window.pwned=1</script>").await;
    let injected = c
        .execute(
            "return [window.pwned === undefined, document.querySelectorAll('main script').length];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        injected,
        json!([true, 0]),
        "markup from a caller ran or became elements"
    );

    // Define and start a VM from the form.
    c.refresh().await.unwrap();
    let form = c
        .wait()
        .for_element(Locator::Css("form.create"))
        .await
        .unwrap();
    for (field, value) in [
        ("name", "web"),
        ("kernel", kernel.to_str().unwrap()),
        ("cmdline", "probe.power_button"),
    ] {
        let input = form
            .find(Locator::Css(&format!("input[name={field}]")))
            .await
            .unwrap();
        input.clear().await.unwrap();
        input.send_keys(value).await.unwrap();
    }
    form.find(Locator::Css("input[name=start]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    form.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let row = "tr[data-vm=web] td.state-running";
    shown(&c, row).await;

    // Its page, then its console: what is typed reaches the guest, whose answer shows.
    c.goto(&format!("{base}#/vms/web")).await.unwrap();
    wait_text(&c, "Availability this month").await;
    screenshot(&c, "vm-page").await;
    c.goto(&format!("{base}#/vms/web/console")).await.unwrap();
    wait_text(&c, "attached").await;
    // The scrollback from console.log: what the probe said before anyone attached.
    wait_text(&c, "PROBE power_button waiting").await;
    // A second viewer (another browser, signed in on its own) sees the same output.
    let second = browser(&driver).await;
    sign_in(&second, &base, &operator).await;
    second
        .goto(&format!("{base}#/vms/web/console"))
        .await
        .unwrap();
    wait_text(&second, "attached").await;
    let terminal = c
        .wait()
        .for_element(Locator::Css(".xterm-helper-textarea"))
        .await
        .unwrap();
    terminal.send_keys("k").await.unwrap();
    wait_text(&c, "PROBE serial_in 0x6b").await;
    wait_text(&second, "PROBE serial_in 0x6b").await;
    second.close().await.unwrap();
    screenshot(&c, "console").await;

    // Pause and resume it from the list (no confirmation: nothing is lost).
    c.goto(&base).await.unwrap();
    c.wait().for_element(Locator::Css(row)).await.unwrap();
    click_button(&c, "Pause web").await;
    shown(&c, "tr[data-vm=web] td.state-paused").await;
    assert_eq!(daemon.state("web"), "paused");
    click_button(&c, "Resume web").await;
    shown(&c, row).await;

    // Its page offers the moves: a snapshot (then listed), an upgrade of its VMM (a new
    // process, the guest running on), and a migration, here to a target that cannot be
    // reached: it fails, saying so, and the VM runs on here.
    c.goto(&format!("{base}#/vms/web")).await.unwrap();
    wait_text(&c, "No snapshots.").await;
    click_button(&c, "Snapshot web").await;
    shown(&c, "tr[data-snapshot=snap-1]").await;
    wait_text(&c, "Snapshot snap-1 taken").await;
    let before = daemon.json(&["vm", "show", "web"])["pid"].as_u64().unwrap();
    click_button(&c, "Upgrade the VMM of web").await;
    wait_text(&c, "Its VMM was upgraded").await;
    let after = daemon.json(&["vm", "show", "web"])["pid"].as_u64().unwrap();
    assert_ne!(before, after, "the VMM was not replaced");
    assert_eq!(daemon.state("web"), "running");
    let form = c.find(Locator::Css("form.migrate")).await.unwrap();
    for (field, value) in [
        ("to", "https://127.0.0.1:1"),
        ("fingerprint", &"ab".repeat(32)),
        ("token", "not-a-token"),
    ] {
        form.find(Locator::Css(&format!("input[name={field}]")))
            .await
            .unwrap()
            .send_keys(value)
            .await
            .unwrap();
    }
    click_button(&c, "Migrate web").await;
    shown(&c, ".migration[data-phase=failed]").await;
    assert_eq!(daemon.state("web"), "running");
    let problems = accessibility_problems(&c).await;
    assert!(
        problems.is_empty(),
        "axe-core on the VM page with its moves: {problems:#?}"
    );
    screenshot(&c, "vm-moves").await;
    c.goto(&base).await.unwrap();
    c.wait().for_element(Locator::Css(row)).await.unwrap();

    // Shut it down from the list (a confirmation first).
    click_button(&c, "Shut down web").await;
    c.accept_alert().await.unwrap();
    shown(&c, "tr[data-vm=web] td.state-stopped").await;

    // Start it again, then kill its VMM behind the daemon's back: the incident appears on
    // the page without a reload (pushed), and is acknowledged from there.
    // This time with the keyboard alone: Tab through the page to the button, then Enter.
    press_with_keyboard(&c, "Start web").await;
    shown(&c, row).await;
    let pid = daemon.json(&["vm", "show", "web"])["pid"].as_u64().unwrap();
    // SAFETY: kill(2) with a pid the daemon reports for its VMM.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    shown(&c, "tr.incident").await;
    wait_text(&c, "vmm-crash").await;
    screenshot(&c, "front-page-incident").await;
    let problems = accessibility_problems(&c).await;
    assert!(
        problems.is_empty(),
        "axe-core with an incident: {problems:#?}"
    );
    c.find(Locator::XPath(
        "//tr[contains(@class,'incident')]//button[text()='Acknowledge']",
    ))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    let deadline = Instant::now() + WAIT;
    while !c
        .find_all(Locator::Css("tr.incident"))
        .await
        .unwrap()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the incident stayed after Acknowledge"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The events page shows the ledger; the SLA page reports, charts and offers the evidence.
    c.goto(&format!("{base}#/events")).await.unwrap();
    wait_text(&c, "incident 1 acknowledged").await;
    c.goto(&format!("{base}#/sla")).await.unwrap();
    wait_text(&c, "Availability per day").await;
    c.find(Locator::XPath("//button[text()='Verify the ledger now']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&c, "Verified:").await;
    screenshot(&c, "sla").await;
    let mut links = Vec::new();
    for a in c.find_all(Locator::Css(".downloads a")).await.unwrap() {
        links.push(a.attr("href").await.unwrap().unwrap());
    }
    assert_eq!(links.len(), 3, "{links:?}");
    for link in &links {
        // What the link downloads, fetched as the page would (same session, same origin).
        let got = c
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 fetch(arguments[0], { credentials: 'same-origin' })
                   .then(async r => done([r.status, r.headers.get('content-type'), (await r.text()).slice(0, 200)]));",
                vec![json!(link)],
            )
            .await
            .unwrap();
        assert_eq!(got[0], 200, "{link}: {got}");
        eprintln!(
            "browser: evidence {link}: {} {:?}",
            got[1],
            got[2].as_str().unwrap().lines().next()
        );
    }
    let problems = accessibility_problems(&c).await;
    assert!(
        problems.is_empty(),
        "axe-core on the SLA page: {problems:#?}"
    );

    // The image library: an image imported (here by the CLI) is listed, then removed from
    // the page after a confirmation.
    let library_file = images.join("lib.raw");
    std::fs::write(&library_file, vec![0u8; 1 << 20]).unwrap();
    daemon.ok(&[
        "image",
        "import",
        library_file.to_str().unwrap(),
        "--name",
        "lib",
    ]);
    c.goto(&format!("{base}#/images")).await.unwrap();
    shown(&c, "tr[data-image=lib]").await;
    wait_text(&c, "no VM").await;
    screenshot(&c, "images").await;
    click_button(&c, "Remove lib").await;
    c.accept_alert().await.unwrap();
    let deadline = Instant::now() + WAIT;
    while c.find(Locator::Css("tr[data-image=lib]")).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the removed image is still listed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(daemon
        .fails(&["image", "show", "lib"])
        .contains("no image named"));

    // A viewer sees the VMs but no button that would change anything.
    sign_out(&c).await;
    sign_in(&c, &base, &viewer).await;
    wait_text(&c, "web").await;
    let buttons: Vec<String> = {
        let mut labels = Vec::new();
        for b in c.find_all(Locator::Css("main button")).await.unwrap() {
            labels.push(b.text().await.unwrap());
        }
        labels
    };
    assert!(buttons.is_empty(), "a viewer is offered {buttons:?}");
    c.goto(&format!("{base}#/vms/web")).await.unwrap();
    wait_text(&c, "Definition").await;
    assert!(c
        .find_all(Locator::Css("main button"))
        .await
        .unwrap()
        .is_empty());
    assert!(c
        .find_all(Locator::Css("a.button"))
        .await
        .unwrap()
        .is_empty());
    assert!(c
        .find_all(Locator::Css("form.create"))
        .await
        .unwrap()
        .is_empty());
    c.close().await.unwrap();
}
