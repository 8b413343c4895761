//! The web console as the daemon serves it, from outside over TLS: a browser opening the
//! address is sent to the console; its pages carry a strict Content-Security-Policy and may
//! not be framed; signing in trades a token for a session cookie that scripts cannot read, no
//! other site sends and only TLS carries; a request with that cookie that changes something
//! must come from the host's own pages; removing the token ends the session. (The browser
//! tests drive the pages themselves.)

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use common::daemon::{free_port, Daemon};

/// One HTTPS request (the certificate pinned by fingerprint); the answer's head and body.
fn https(addr: &str, fingerprint: &str, request: &str) -> (String, String) {
    let pinned = host::tls::Pinned::new(Some(fingerprint.to_string()), Default::default());
    let config = rustls::ClientConfig::builder_with_provider(host::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(pinned))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tcp = TcpStream::connect(addr).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    tls.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_ascii_lowercase(), body.to_string())
}

fn status(head: &str) -> u16 {
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn the_console_is_served_with_strict_headers_and_cookie_sessions() {
    let listen = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start_with("console-web", &[], &["--listen", &listen], &[]);
    let (_, fp) = daemon.https(&listen);
    let token = daemon
        .ok(&["token", "create", "watcher", "--role", "viewer"])
        .trim()
        .to_string();
    let get = |path: &str, extra: &str| {
        https(
            &listen,
            &fp,
            &format!("GET {path} HTTP/1.1\r\nHost: {listen}\r\nConnection: close\r\n{extra}\r\n"),
        )
    };

    // A browser at the address is sent to the console; API clients still get JSON.
    let (head, _) = get("/", "Accept: text/html,application/xhtml+xml\r\n");
    assert_eq!(status(&head), 303, "{head}");
    assert!(head.contains("location: /ui/"), "{head}");
    let (head, _) = get("/", "Accept: application/json\r\n");
    assert_eq!(status(&head), 401, "{head}");

    let (head, body) = get("/ui/", "");
    assert_eq!(status(&head), 200, "{head}");
    assert!(
        !body.contains("was not built"),
        "the console is not in this keel binary: build it with scripts/build-console.sh before cargo build"
    );
    assert!(
        head.contains("content-security-policy: default-src 'self'; script-src 'self';"),
        "{head}"
    );
    assert!(head.contains("x-frame-options: deny"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    // No inline script: the page only names its bundle.
    assert!(!body.contains("<script>") && body.contains("<script type=\"module\" src=\"app-"));
    let script = body
        .split("src=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let (head, js) = get(&format!("/ui/{script}"), "");
    assert_eq!(status(&head), 200);
    assert!(head.contains("content-type: text/javascript"), "{head}");
    assert!(js.len() > 1000);

    // Signing in: the token goes once in a header; the cookie is HttpOnly, SameSite=Strict,
    // Secure.
    let (head, body) = https(
        &listen,
        &fp,
        &format!("POST /session HTTP/1.1\r\nHost: {listen}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status(&head), 201, "{head}{body}");
    let cookie_line = head
        .lines()
        .find(|l| l.starts_with("set-cookie:"))
        .unwrap()
        .to_string();
    for flag in ["httponly", "samesite=strict", "secure", "path=/"] {
        assert!(cookie_line.contains(flag), "{cookie_line}");
    }
    assert!(body.contains("\"role\":\"viewer\""), "{body}");
    let cookie = cookie_line
        .trim_start_matches("set-cookie: ")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let with_cookie = format!("Cookie: {cookie}\r\n");
    let (head, body) = get("/session", &with_cookie);
    assert_eq!(status(&head), 200, "{body}");
    assert!(body.contains("token:watcher"), "{body}");

    // A request with the cookie that changes something, from another site's page: refused.
    let change = |origin: &str| {
        https(
            &listen,
            &fp,
            &format!("DELETE /session HTTP/1.1\r\nHost: {listen}\r\n{with_cookie}{origin}Connection: close\r\n\r\n"),
        )
    };
    let (head, body) = change("Origin: https://evil.example\r\n");
    assert_eq!(status(&head), 403, "{body}");
    assert!(body.contains("this host's own pages"), "{body}");
    let (head, _) = change("");
    assert_eq!(status(&head), 403, "no Origin at all is refused too");

    // The session stands for its token: removing the token ends it.
    daemon.ok(&["token", "rm", "watcher"]);
    let (head, _) = get("/session", &with_cookie);
    assert_eq!(status(&head), 401, "{head}");
}
