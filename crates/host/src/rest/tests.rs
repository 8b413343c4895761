//! The router against a real store: its OpenAPI document, what each request needs, and
//! random requests.

use super::*;

#[test]
fn the_openapi_document_has_every_schema_it_refers_to() {
    let doc = serde_json::to_value(openapi_document()).unwrap();
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let text = doc.to_string();
    let prefix = "#/components/schemas/";
    for (at, _) in text.match_indices(prefix) {
        let name: String = text[at + prefix.len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(schemas.contains_key(&name), "dangling reference to {name}");
    }
    assert_eq!(doc["paths"].as_object().unwrap().len(), 36);
    let console = &doc["paths"]["/vms/{name}/console"]["get"];
    assert!(console["description"]
        .as_str()
        .unwrap()
        .contains("WebSocket upgrade"));
    assert!(console["responses"]["101"].is_object(), "{console}");
    assert!(console["responses"]["409"].is_object(), "{console}");
}

#[test]
fn what_a_request_needs() {
    assert_eq!(need_of(&Method::GET, "/vms"), Need::Read);
    assert_eq!(need_of(&Method::POST, "/vms"), Need::Create);
    assert_eq!(need_of(&Method::DELETE, "/vms/a"), Need::Create);
    assert_eq!(need_of(&Method::POST, "/images"), Need::Create);
    assert_eq!(need_of(&Method::POST, "/imports"), Need::Create);
    assert_eq!(need_of(&Method::POST, "/vms/a/clone"), Need::Create);
    assert_eq!(need_of(&Method::POST, "/vms/a/migrate"), Need::Create);
    assert_eq!(need_of(&Method::GET, "/migrations/incoming"), Need::Create);
    assert_eq!(need_of(&Method::GET, "/vms/a/migration"), Need::Read);
    assert_eq!(need_of(&Method::DELETE, "/images/base"), Need::Create);
    assert_eq!(need_of(&Method::GET, "/operations/1"), Need::Read);
    assert_eq!(need_of(&Method::POST, "/vms/a/start"), Need::Operate);
    assert_eq!(need_of(&Method::POST, "/vms/a/pause"), Need::Operate);
    assert_eq!(need_of(&Method::POST, "/vms/a/resume"), Need::Operate);
    assert_eq!(need_of(&Method::POST, "/vms/a/upgrade"), Need::Operate);
    assert_eq!(need_of(&Method::POST, "/host/upgrade"), Need::Admin);
    assert_eq!(need_of(&Method::GET, "/tokens"), Need::Admin);
    // The console's WebSocket upgrade is a GET, but it controls the guest.
    assert_eq!(need_of(&Method::GET, "/vms/a/console"), Need::Operate);
    assert_eq!(need_of(&Method::GET, "/vms/a/console/"), Need::Operate);
    assert_eq!(need_of(&Method::GET, "/vms/console"), Need::Read);
    assert_eq!(need_of(&Method::GET, "/vms/a/console/log"), Need::Operate);
    assert!(is_console("/vms/a/console") && !is_console("/vms/console"));
    assert_eq!(vm_of_path("/vms/a/start").as_deref(), Some("a"));
    assert_eq!(vm_of_path("/vms"), None);
}

/// The router over a real store in a fresh directory. Starting a VM runs /bin/false as its
/// VMM: it exits at once without an exit record, as a VMM that cannot start does, which is a
/// 422 with the reason.
fn fixture(tag: &str) -> (std::path::PathBuf, Router) {
    let dir = std::env::temp_dir().join(format!("keel-rest-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = crate::store::Store::open(&dir.join("keel.db")).unwrap();
    let app = Supervisor::new(
        dir.clone(),
        "/bin/false".into(),
        store,
        crate::supervisor::HostPolicy::unjailed(&dir).unwrap(),
    );
    let access = Arc::new(auth::Access {
        local: auth::LocalRoles::default(),
        refusals: Default::default(),
        sessions: Default::default(),
        tls: false,
        answers: Default::default(),
    });
    (dir, router(app, access))
}

/// Random requests (seeded, printed) against the real router and a real store: every
/// answer is JSON with a status below 500, and nothing panics.
#[tokio::test]
async fn random_requests_never_get_a_5xx() {
    use axum::body::Body as HttpBody;
    use tower::ServiceExt;

    let (dir, router) = fixture("fuzz");
    let root = axum::extract::ConnectInfo(Peer::Unix { uid: 0, pid: 1 });
    let router = router.layer(axum::Extension(root));
    let seed = std::env::var("KEEL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(now_ms() as u64 | 1);
    eprintln!("random_requests_never_get_a_5xx: KEEL_TEST_SEED={seed}");
    let mut state = seed;
    let mut next = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let names = [
        "a",
        "vm-1",
        "%00",
        "..",
        "x".repeat(300).leak(),
        "ü",
        "a%2Fb",
        "",
    ];
    let paths = [
        "/",
        "/vms",
        "/vms/{}",
        "/vms/{}/start",
        "/vms/{}/stop",
        "/vms/{}/reboot",
        "/vms/{}/shutdown?timeout_s=0&wait=false",
        "/vms/{}/shutdown?timeout_s=x",
        "/vms/{}/console",
        "/events?limit={}",
        "/events?since={}&kind=state",
        "/sla?from={}&to=2030-01-01T00:00:00Z",
        "/ledger/verify?expect_head={}",
        "/incidents/{}/ack",
        "/tokens",
        "/tokens/{}",
        "/openapi.json",
        "/{}",
    ];
    let bodies = [
        String::new(),
        "{".into(),
        "null".into(),
        r#"{"name":"a","kernel":"/k"}"#.into(),
        r#"{"name":"vm-1","kernel":"/nonexistent/kernel","cpus":2,"disks":[{"path":"/d"}]}"#.into(),
        r#"{"name":"t","role":"viewer","expires":"2030-01-01T00:00:00Z"}"#.into(),
        r#"{"name":"a","kernel":"/k","memory_mib":18446744073709551615,"cpus":4294967295}"#.into(),
        r#"{"name":"a","kernel":"/k","vsock":{"cid":1},"nets":[{"tap":"","mac":"zz"}]}"#.into(),
        "\u{0}\u{ff}garbage".into(),
    ];
    let methods = [
        Method::GET,
        Method::POST,
        Method::DELETE,
        Method::PUT,
        Method::PATCH,
    ];
    for round in 0..1500 {
        let name = names[next(names.len())];
        let path = paths[next(paths.len())].replace("{}", name);
        let method = methods[next(methods.len())].clone();
        let body = bodies[next(bodies.len())].clone();
        let request = axum::http::Request::builder()
            .method(method.clone())
            .uri(&path)
            .header(
                "content-type",
                if next(4) == 0 {
                    "text/plain"
                } else {
                    "application/json"
                },
            )
            .body(HttpBody::from(body.clone()));
        let Ok(request) = request else {
            continue; // not even a valid URI: no server would see it
        };
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        assert!(
            status.as_u16() < 500,
            "round {round}: {method} {path} {body:?} -> {status} (seed {seed})"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A request whose connection the listener did not name is refused, never taken for root.
#[tokio::test]
async fn a_request_without_a_known_peer_is_refused() {
    use axum::body::Body as HttpBody;
    use tower::ServiceExt;

    let (dir, router) = fixture("peer");
    let request = axum::http::Request::builder()
        .uri("/tokens")
        .body(HttpBody::empty())
        .unwrap();
    let response = router.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every operation of the document, as (method, path template).
fn documented_operations() -> Vec<(Method, String)> {
    let doc = serde_json::to_value(openapi_document()).unwrap();
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.push((method.to_uppercase().parse().unwrap(), path.clone()));
        }
    }
    ops
}

/// The document's parameters say where they go: each `{name}` of a path is a required path
/// parameter, and no other parameter is a path parameter (a client generator would put a
/// query value into the URL's path, or never send it).
#[test]
fn parameters_are_where_the_paths_say() {
    let doc = serde_json::to_value(openapi_document()).unwrap();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let in_template: std::collections::BTreeSet<String> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(str::to_string)
            .collect();
        for (method, op) in item.as_object().unwrap() {
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let in_path: std::collections::BTreeSet<String> = params
                .iter()
                .filter(|p| p["in"] == "path")
                .map(|p| {
                    assert_eq!(p["required"], true, "{method} {path}: {p}");
                    p["name"].as_str().unwrap().to_string()
                })
                .collect();
            assert_eq!(in_path, in_template, "{method} {path}");
            for p in &params {
                assert!(
                    p["in"] == "path" || p["in"] == "query",
                    "{method} {path}: {p}"
                );
            }
            for status in ["401", "403", "429"] {
                assert!(
                    op["responses"][status].is_object(),
                    "{method} {path} does not document {status}"
                );
            }
        }
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

/// Each documented operation reaches a handler of the router (not the fallback, not 405),
/// and each other method on a documented path is 405: the router serves exactly what the
/// document says. (Routes and document come from the same attributes, so a route cannot be
/// added without its document; this checks that the two really agree.)
#[tokio::test]
async fn the_router_serves_exactly_the_documented_operations() {
    use axum::body::Body as HttpBody;
    use tower::ServiceExt;

    let (dir, router) = fixture("routes");
    let root = axum::extract::ConnectInfo(Peer::Unix { uid: 0, pid: 1 });
    let router = router.layer(axum::Extension(root));
    let operations = documented_operations();
    assert!(operations.len() >= 19, "{operations:?}");
    let send = |method: Method, template: &str| {
        let uri = template.replace("{name}", "nosuch").replace("{id}", "999");
        let request = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .body(HttpBody::empty())
            .unwrap();
        router.clone().oneshot(request)
    };
    for (method, path) in &operations {
        let response = send(method.clone(), path).await.unwrap();
        let status = response.status();
        // A stream (server-sent events) never ends: its first bytes are enough.
        let body = if path == "/events/stream" {
            axum::body::Bytes::new()
        } else {
            axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap()
        };
        let text = String::from_utf8_lossy(&body);
        assert!(
            status != StatusCode::METHOD_NOT_ALLOWED && !text.contains("no such API path"),
            "{method} {path}: {status} {text}"
        );
    }
    let paths: std::collections::BTreeSet<&String> = operations.iter().map(|(_, p)| p).collect();
    for path in paths {
        for method in [
            Method::GET,
            Method::POST,
            Method::DELETE,
            Method::PUT,
            Method::PATCH,
        ] {
            if operations.iter().any(|(m, p)| *m == method && p == path) {
                continue;
            }
            let status = send(method.clone(), path).await.unwrap().status();
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
