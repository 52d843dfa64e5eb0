//! amoauth behind a real nginx with TLS, routed only `/amocrm/`, using the shipped
//! `deploy/nginx-amocrm.conf`. Needs Debian's `nginx` and `openssl`; ignored without them,
//! except in CI, where `.ci/run` installs them.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::*;

const NGINX: &str = "/usr/sbin/nginx";

/// nginx in the foreground with its own prefix directory; killed when dropped.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM, not KILL: the master then stops its workers too instead of orphaning them.
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn start_nginx(dir: &Path, port: u16, upstream_port: u16) -> Nginx {
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "openssl made no certificate");
    // The shipped block, pointed at this test's amoauth.
    let shipped = include_str!("../../deploy/nginx-amocrm.conf");
    assert!(shipped.contains("proxy_pass http://127.0.0.1:8080;"));
    let location = shipped.replace("127.0.0.1:8080", &format!("127.0.0.1:{upstream_port}"));
    let d = dir.display();
    let config = format!(
        "daemon off; pid {d}/nginx.pid; error_log {d}/error.log; worker_processes 1;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n\
           access_log {d}/access.log; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
           server {{\n\
             listen 127.0.0.1:{port} ssl; server_name 127.0.0.1;\n\
             ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;\n\
             {location}\n\
           }}\n\
         }}\n"
    );
    std::fs::write(dir.join("nginx.conf"), config).unwrap();
    let child = Command::new(NGINX)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Nginx(child)
}

#[tokio::test]
#[cfg_attr(amoauth_lacks_nginx, ignore = "apt-get install -y nginx openssl")]
async fn the_flow_works_through_nginx_with_tls_under_a_prefix() {
    require_programs(
        &[NGINX, "/usr/bin/openssl"],
        "apt-get install -y nginx openssl",
    );
    let nginx_port = free_port();
    let public = format!("https://127.0.0.1:{nginx_port}");
    let options = Options {
        base_path: Some("/amocrm/"),
        trusted_proxies: Some("127.0.0.1"),
        public_url: Some(public.clone()),
        ..Options::default()
    };
    let app = TestApp::spawn_with(&Backend::Sqlite, options).await;
    let dir = tempfile::tempdir().unwrap();
    let upstream_port = app.base.rsplit(':').next().unwrap().parse().unwrap();
    let _nginx = start_nginx(dir.path(), nginx_port, upstream_port);
    // The visitor comes from 127.0.0.2, nginx from 127.0.0.1: the audit must show the visitor.
    let visitor = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .danger_accept_invalid_certs(true)
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let mut ready = false;
    for _ in 0..100 {
        if let Ok(response) = visitor.get(format!("{public}/amocrm/healthz")).send().await {
            ready = response.status() == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        ready,
        "nginx did not start: {}",
        std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
    );

    let login = visitor
        .post(format!("{public}/amocrm/login"))
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(location(&login), "/amocrm/");
    let set_cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set_cookie.contains("; Secure"),
        "https site, Secure cookie: {set_cookie}"
    );
    assert!(login.headers().contains_key("strict-transport-security"));
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let install = visitor
        .get(format!("{public}/amocrm/install"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(install.status(), 303);
    let callback = consent(
        &http_client(),
        &app.sandbox_origin,
        &location(&install),
        "allow",
    )
    .await;
    assert!(
        callback.starts_with(&format!("{public}/amocrm/callback?")),
        "{callback}"
    );

    let result = result_url(&visitor, &callback).await;
    assert!(
        result.starts_with(&format!("{public}/amocrm/callback/result?")),
        "the result page is on the public origin, under /amocrm/: {result}"
    );
    let page = visitor.get(&result).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();

    assert!(page.contains("amoCRM успешно подключена!"), "{page}");
    assert!(
        page.contains(r#"href="/amocrm/""#),
        "the dashboard link: {page}"
    );
    let ip = app
        .db()
        .string("SELECT ip FROM amocrm_oauth_attempts WHERE kind = 'callback'")
        .await;
    assert_eq!(ip, "127.0.0.2", "the visitor's address, not nginx's");
    let dashboard = visitor
        .get(format!("{public}/amocrm/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(dashboard.status(), 200);
    let dashboard = dashboard.text().await.unwrap();
    assert!(
        dashboard.contains("demo.amocrm.ru") && dashboard.contains(r#"action="/amocrm/logout""#),
        "{dashboard}"
    );
    app.stop().await;
}
