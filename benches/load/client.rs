//! The load generator's HTTP side: one keep-alive HTTP/1.1 connection per target and worker,
//! straight on hyper (no pool, no redirects followed), and a browser-like cookie jar.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, HeaderMap, HeaderValue, LOCATION, SET_COOKIE};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// An answer with its body read to the end.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The `Location` header of a redirect, or an error naming what came instead.
    pub fn location(&self) -> anyhow::Result<url::Url> {
        if self.status != StatusCode::FOUND && self.status != StatusCode::SEE_OTHER {
            bail!(
                "expected a redirect, got {}: {}",
                self.status,
                self.snippet()
            );
        }
        let location = self
            .headers
            .get(LOCATION)
            .context("redirect without Location")?;
        url::Url::parse(location.to_str()?).context("Location is not an absolute URL")
    }

    /// Fails unless the status is `expected`.
    pub fn expect(self, expected: StatusCode) -> anyhow::Result<Self> {
        if self.status != expected {
            bail!(
                "expected {expected}, got {}: {}",
                self.status,
                self.snippet()
            );
        }
        Ok(self)
    }

    fn snippet(&self) -> String {
        String::from_utf8_lossy(&self.body[..self.body.len().min(200)]).into_owned()
    }
}

/// One keep-alive connection to one server; reconnects when the server closed it.
pub struct Conn {
    addr: SocketAddr,
    host: HeaderValue,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            host: HeaderValue::from_str(&addr.to_string()).expect("an address is a valid header"),
            sender: None,
        }
    }

    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Reply> {
        self.send(Method::GET, path, headers, None).await
    }

    pub async fn post_form(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        form: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let body = ("application/x-www-form-urlencoded", Bytes::from(body));
        self.send(Method::POST, path, headers, Some(body)).await
    }

    pub async fn post_json(
        &mut self,
        path: &str,
        json: &serde_json::Value,
    ) -> anyhow::Result<Reply> {
        let body = ("application/json", Bytes::from(json.to_string()));
        self.send(Method::POST, path, &[], Some(body)).await
    }

    /// A JSON body with any method, e.g. a POST or PATCH to amoCRM's API with a Bearer token.
    pub async fn json(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        json: &serde_json::Value,
    ) -> anyhow::Result<Reply> {
        let body = ("application/json", Bytes::from(json.to_string()));
        self.send(method, path, headers, Some(body)).await
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&'static str, Bytes)>,
    ) -> anyhow::Result<Reply> {
        let mut request = Request::builder().method(method).uri(path);
        let request_headers = request
            .headers_mut()
            .expect("the builder holds no error yet");
        request_headers.insert(HOST, self.host.clone());
        for (name, value) in headers.iter().filter(|(_, value)| !value.is_empty()) {
            request_headers.append(
                hyper::header::HeaderName::from_bytes(name.as_bytes())?,
                HeaderValue::from_str(value)?,
            );
        }
        let body = match body {
            Some((content_type, bytes)) => {
                request_headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                bytes
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(body))?;
        let sender = self.ready().await?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("request to {}", self.addr))?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    async fn ready(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        if let Some(sender) = &mut self.sender
            && sender.ready().await.is_err()
        {
            self.sender = None;
        }
        if self.sender.is_none() {
            let stream = tokio::net::TcpStream::connect(self.addr)
                .await
                .with_context(|| format!("connecting to {}", self.addr))?;
            stream.set_nodelay(true)?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("set just above"))
    }
}

/// Cookies by server, as a browser keeps them: what a server sets is sent back to it only.
#[derive(Clone, Default)]
pub struct CookieJar {
    cookies: Vec<(SocketAddr, String)>,
}

impl CookieJar {
    /// Keeps every `name=value` the reply set, replacing an older cookie of the same name.
    pub fn store(&mut self, from: SocketAddr, reply: &Reply) {
        for header in reply.headers.get_all(SET_COOKIE) {
            let Some(pair) = header.to_str().ok().and_then(|v| v.split(';').next()) else {
                continue;
            };
            let name = pair.split('=').next().unwrap_or_default();
            self.cookies
                .retain(|(addr, kept)| *addr != from || kept.split('=').next() != Some(name));
            self.cookies.push((from, pair.trim().to_owned()));
        }
    }

    /// Starts the jar with a cookie the browser already had, e.g. `amoauth_session=…`.
    pub fn set(&mut self, at: SocketAddr, pair: &str) {
        self.cookies.push((at, pair.to_owned()));
    }

    /// The `Cookie` header value for a request to `to`; empty when none belongs to it.
    pub fn header(&self, to: SocketAddr) -> String {
        let pairs: Vec<&str> = self
            .cookies
            .iter()
            .filter(|(addr, _)| *addr == to)
            .map(|(_, pair)| pair.as_str())
            .collect();
        pairs.join("; ")
    }
}
