//! The sandbox's slice of amoCRM's REST API: `/api/v4/leads` and `/api/v4/contacts` (list
//! with pagination, get, create, update), stored per account, behind amoCRM's guards: the
//! Bearer token, a limit of requests per second per account (429 beyond it), an IP block after
//! repeated 429s (403 on every such API request from that IP, for every account) and
//! injectable faults. Per-account counters tell tests and the bench what a client really sent.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, Path, Request, State as AxumState};
use axum::http::StatusCode;
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};

use super::routes::{bearer_token, deliver, play, request_host};
use super::state::{ApiError, State};
use super::{Fault, Sandbox, SandboxAccount};

/// amoCRM: at most 250 entities per page and per create or update request.
const MAX_BATCH: usize = 250;
/// amoCRM's page size when `limit` is not given.
const DEFAULT_LIMIT: usize = 50;
/// Ids start high so they never look like the small numbers tests use as request ids.
const FIRST_ID: i64 = 40_000_001;
/// Fields amoCRM sets itself; a client's values for them are ignored.
const READ_ONLY_FIELDS: [&str; 6] = [
    "id",
    "account_id",
    "created_at",
    "updated_at",
    "request_id",
    "_links",
];
/// amoCRM's bodies are far smaller; this only keeps a runaway test from eating memory.
const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
const ONE_SECOND: Duration = Duration::from_secs(1);

/// amoCRM's API limits as the sandbox enforces them.
#[derive(Clone, Debug)]
pub struct ApiLimits {
    /// Requests an account may make in any one second, a sliding window (amoCRM: 7). A request
    /// beyond it gets 429 and does not count against the window itself.
    pub requests_per_second: usize,
    /// The IP block starts when one client IP got more than this many 429s within
    /// `block_window`. amoCRM does not publish its rule; 20 in a minute is the sandbox's.
    pub block_after_429s: usize,
    /// The window in which `block_after_429s` 429s start the IP block.
    pub block_window: Duration,
    /// How long a blocked IP gets 403 on every API request, for every account.
    /// [`Sandbox::lift_ip_blocks`] ends it early.
    pub block_duration: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            requests_per_second: 7,
            block_after_429s: 20,
            block_window: Duration::from_secs(60),
            block_duration: Duration::from_secs(15 * 60),
        }
    }
}

/// A fault for the leads and contacts API, played after the token, the IP block and the rate
/// limit have let the request through (so the request counts, as on amoCRM).
#[derive(Clone, Debug)]
pub struct ApiFault {
    /// What the API does instead of answering.
    pub fault: Fault,
    /// Only this account's requests; `None`: every account's.
    pub account_id: Option<i64>,
    /// Only this many requests, then the fault clears itself; `None`: until cleared.
    pub times: Option<u32>,
}

impl ApiFault {
    /// The fault on every API request of every account until cleared.
    pub fn always(fault: Fault) -> Self {
        Self {
            fault,
            account_id: None,
            times: None,
        }
    }

    /// The fault on the next `times` API requests only.
    pub fn times(fault: Fault, times: u32) -> Self {
        Self {
            times: Some(times),
            ..Self::always(fault)
        }
    }

    /// The same fault, limited to one account's requests.
    pub fn for_account(self, account_id: i64) -> Self {
        Self {
            account_id: Some(account_id),
            ..self
        }
    }
}

/// What one account's API saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApiAccountStats {
    /// Requests with the account's valid token from an unblocked IP, whatever the answer
    /// (429s and injected faults included).
    pub requests: u64,
    /// The most of those requests that arrived within any one second (a sliding window). No
    /// 429 was ever sent to the account exactly when this is at most the limit.
    pub max_per_second: usize,
    /// 429 answers: over the per-second limit.
    pub too_many_requests: u64,
    /// 403 answers of the IP block to requests with the account's valid token.
    pub forbidden: u64,
}

/// What the leads and contacts API saw, per account.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApiStats {
    /// Per account id: what its requests met.
    pub accounts: BTreeMap<i64, ApiAccountStats>,
    /// 401 answers: no token, or an unknown, expired or revoked one.
    pub unauthorized: u64,
    /// 403 answers of the IP block to requests without a valid token.
    pub forbidden_without_account: u64,
}

impl ApiStats {
    /// One account's counters; zeros if it made no request.
    pub fn account(&self, account_id: i64) -> ApiAccountStats {
        self.accounts.get(&account_id).cloned().unwrap_or_default()
    }

    /// Requests that reached any account.
    pub fn requests(&self) -> u64 {
        self.accounts.values().map(|a| a.requests).sum()
    }

    /// 429 answers over every account.
    pub fn too_many_requests(&self) -> u64 {
        self.accounts.values().map(|a| a.too_many_requests).sum()
    }

    /// 403 answers of the IP block, with or without a valid token.
    pub fn forbidden(&self) -> u64 {
        self.accounts.values().map(|a| a.forbidden).sum::<u64>() + self.forbidden_without_account
    }

    /// The most requests any one account received within any one second.
    pub fn max_per_second(&self) -> usize {
        self.accounts
            .values()
            .map(|a| a.max_per_second)
            .max()
            .unwrap_or(0)
    }
}

impl Sandbox {
    /// The API's counters so far.
    pub fn api_stats(&self) -> ApiStats {
        self.api().stats.clone()
    }

    /// A fault for the leads and contacts API (see [`ApiFault`]); `None` clears it.
    pub fn set_api_fault(&self, fault: Option<ApiFault>) {
        self.api().fault = fault;
    }

    /// Ends every IP block at once and forgets the 429s counted toward the next one.
    pub fn lift_ip_blocks(&self) {
        let mut api = self.api();
        api.blocked_until.clear();
        api.recent_429s.clear();
    }
}

/// The API's share of the sandbox state, behind its own lock.
#[derive(Default)]
pub(super) struct ApiState {
    stats: ApiStats,
    fault: Option<ApiFault>,
    traffic: HashMap<i64, Traffic>,
    records: HashMap<i64, Records>,
    /// Ids are unique across accounts and kinds, as amoCRM's look to a client.
    issued_ids: i64,
    /// Per client IP (`None` when served without connect info): when its recent 429s were sent.
    recent_429s: HashMap<Option<IpAddr>, VecDeque<Instant>>,
    blocked_until: HashMap<Option<IpAddr>, Instant>,
}

/// One account's arrivals within the last second.
#[derive(Default)]
struct Traffic {
    /// Every counted request, for `max_per_second`.
    arrived: VecDeque<Instant>,
    /// Requests let through, against which the limit is checked.
    admitted: VecDeque<Instant>,
}

#[derive(Default)]
struct Records {
    leads: BTreeMap<i64, Map<String, Value>>,
    contacts: BTreeMap<i64, Map<String, Value>>,
}

impl Records {
    fn of(&mut self, kind: Kind) -> &mut BTreeMap<i64, Map<String, Value>> {
        match kind {
            Kind::Leads => &mut self.leads,
            Kind::Contacts => &mut self.contacts,
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Leads,
    Contacts,
}

impl Kind {
    fn parse(segment: &str) -> Option<Self> {
        match segment {
            "leads" => Some(Self::Leads),
            "contacts" => Some(Self::Contacts),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Leads => "leads",
            Self::Contacts => "contacts",
        }
    }
}

/// Why a request never reached the entities.
enum Refusal {
    Unauthorized,
    AccountNotFound,
    IpBlocked,
    TooManyRequests { retry_after_secs: u64 },
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Self::Unauthorized => problem(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "The access token is missing, invalid or expired",
            ),
            Self::AccountNotFound => {
                problem(StatusCode::NOT_FOUND, "Not Found", "Account not found")
            }
            Self::IpBlocked => problem(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "Your IP address is blocked for repeatedly exceeding the request limits",
            ),
            Self::TooManyRequests { retry_after_secs } => {
                let mut response = problem(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Too Many Requests",
                    "Too many requests per second",
                );
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, retry_after_secs.into());
                response
            }
        }
    }
}

/// The leads and contacts routes; `/api/v4/account` keeps its own, more specific route.
pub(super) fn router() -> Router<Sandbox> {
    Router::new()
        .route(
            "/api/v4/{kind}",
            get(list_records).post(create_records).patch(update_records),
        )
        .route("/api/v4/{kind}/{id}", get(get_record).patch(update_record))
}

/// What a request asks of the entities once it is let through.
enum Operation {
    List,
    Create,
    UpdateMany,
    Get(String),
    UpdateOne(String),
}

async fn list_records(
    AxumState(sandbox): AxumState<Sandbox>,
    Path(kind): Path<String>,
    request: Request,
) -> Response {
    serve(sandbox, &kind, Operation::List, request).await
}

async fn create_records(
    AxumState(sandbox): AxumState<Sandbox>,
    Path(kind): Path<String>,
    request: Request,
) -> Response {
    serve(sandbox, &kind, Operation::Create, request).await
}

async fn update_records(
    AxumState(sandbox): AxumState<Sandbox>,
    Path(kind): Path<String>,
    request: Request,
) -> Response {
    serve(sandbox, &kind, Operation::UpdateMany, request).await
}

async fn get_record(
    AxumState(sandbox): AxumState<Sandbox>,
    Path((kind, id)): Path<(String, String)>,
    request: Request,
) -> Response {
    serve(sandbox, &kind, Operation::Get(id), request).await
}

async fn update_record(
    AxumState(sandbox): AxumState<Sandbox>,
    Path((kind, id)): Path<(String, String)>,
    request: Request,
) -> Response {
    serve(sandbox, &kind, Operation::UpdateOne(id), request).await
}

/// Guards first (token, IP block, rate limit, fault), then the operation. The lock is not
/// held while a fault sleeps or the body arrives.
async fn serve(sandbox: Sandbox, kind: &str, operation: Operation, request: Request) -> Response {
    let Some(kind) = Kind::parse(kind) else {
        return problem(
            StatusCode::NOT_FOUND,
            "Not Found",
            "No such endpoint in the amoCRM sandbox",
        );
    };
    let (parts, body) = request.into_parts();
    let ip = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    let host = request_host(&parts.headers);
    let admitted = admit(
        &mut sandbox.state(),
        &mut sandbox.api(),
        &sandbox.config().api,
        bearer_token(&parts.headers),
        host.as_deref(),
        ip,
    );
    let (account, fault) = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.into_response(),
    };
    if let Some(response) = play(fault.as_ref()).await {
        return response;
    }
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return bad_request("The request body is too large or was cut short");
    };
    let response = {
        let now = sandbox.state().now().timestamp();
        let context = Context {
            account: &account,
            kind,
            now,
        };
        let mut api = sandbox.api();
        match operation {
            Operation::List => api.list(&context, parts.uri.query().unwrap_or_default()),
            Operation::Create => api.create(&context, &body),
            Operation::UpdateMany => api.update_many(&context, &body),
            Operation::Get(id) => api.get(&context, &id),
            Operation::UpdateOne(id) => api.update_one(&context, &id, &body),
        }
    };
    deliver(fault.as_ref(), response).await
}

/// Checks a request in amoCRM's order: the IP block (403 whatever the token), the token and
/// host (401, 404), the account's per-second limit (429, counted toward the IP block). A
/// request let through takes one use of the API fault, if it applies.
fn admit(
    state: &mut State,
    api: &mut ApiState,
    limits: &ApiLimits,
    token: Option<&str>,
    host: Option<&str>,
    ip: Option<IpAddr>,
) -> Result<(SandboxAccount, Option<Fault>), Refusal> {
    let now = Instant::now();
    let account = token
        .ok_or(ApiError::Unauthorized)
        .and_then(|token| state.account_for_access_token(token, host));
    if api.is_blocked(ip, now) {
        match &account {
            Ok(account) => api.stats.accounts.entry(account.id).or_default().forbidden += 1,
            Err(_) => api.stats.forbidden_without_account += 1,
        }
        return Err(Refusal::IpBlocked);
    }
    let account = match account {
        Ok(account) => account,
        Err(ApiError::Unauthorized) => {
            api.stats.unauthorized += 1;
            return Err(Refusal::Unauthorized);
        }
        Err(ApiError::AccountNotFound) => return Err(Refusal::AccountNotFound),
    };

    let traffic = api.traffic.entry(account.id).or_default();
    let stats = api.stats.accounts.entry(account.id).or_default();
    stats.requests += 1;
    forget_older_than_a_second(&mut traffic.arrived, now);
    traffic.arrived.push_back(now);
    stats.max_per_second = stats.max_per_second.max(traffic.arrived.len());
    forget_older_than_a_second(&mut traffic.admitted, now);
    if traffic.admitted.len() >= limits.requests_per_second {
        stats.too_many_requests += 1;
        // The window frees a slot when its oldest request turns one second old.
        let oldest = traffic.admitted.front().copied().unwrap_or(now);
        let wait = ONE_SECOND.saturating_sub(now - oldest);
        let retry_after_secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        api.note_429(limits, ip, now);
        return Err(Refusal::TooManyRequests {
            retry_after_secs: retry_after_secs.max(1),
        });
    }
    traffic.admitted.push_back(now);
    Ok((account.clone(), api.take_fault(account.id)))
}

fn forget_older_than_a_second(window: &mut VecDeque<Instant>, now: Instant) {
    while window.front().is_some_and(|t| now - *t >= ONE_SECOND) {
        window.pop_front();
    }
}

/// What an operation needs to know about the request it serves.
struct Context<'a> {
    account: &'a SandboxAccount,
    kind: Kind,
    /// Sandbox time, Unix seconds: `created_at` and `updated_at`.
    now: i64,
}

impl Context<'_> {
    fn collection_href(&self) -> String {
        format!(
            "https://{}/api/v4/{}",
            self.account.host(),
            self.kind.name()
        )
    }

    fn record_href(&self, id: i64) -> String {
        format!("{}/{id}", self.collection_href())
    }

    fn page_href(&self, page: usize, limit: usize) -> Value {
        json!({ "href": format!("{}?page={page}&limit={limit}", self.collection_href()) })
    }
}

impl ApiState {
    fn is_blocked(&mut self, ip: Option<IpAddr>, now: Instant) -> bool {
        match self.blocked_until.get(&ip) {
            Some(until) if *until > now => true,
            Some(_) => {
                self.blocked_until.remove(&ip);
                false
            }
            None => false,
        }
    }

    /// Counts a 429 toward the IP block and starts the block when the rule says so.
    fn note_429(&mut self, limits: &ApiLimits, ip: Option<IpAddr>, now: Instant) {
        let recent = self.recent_429s.entry(ip).or_default();
        while recent
            .front()
            .is_some_and(|t| now - *t >= limits.block_window)
        {
            recent.pop_front();
        }
        recent.push_back(now);
        if recent.len() > limits.block_after_429s {
            recent.clear();
            self.blocked_until.insert(ip, now + limits.block_duration);
        }
    }

    fn take_fault(&mut self, account_id: i64) -> Option<Fault> {
        let api_fault = self.fault.as_mut()?;
        if api_fault.account_id.is_some_and(|id| id != account_id) {
            return None;
        }
        let fault = api_fault.fault.clone();
        if let Some(times) = api_fault.times.as_mut() {
            *times = times.saturating_sub(1);
            if *times == 0 {
                self.fault = None;
            }
        }
        Some(fault)
    }

    fn records(&mut self, context: &Context) -> &mut BTreeMap<i64, Map<String, Value>> {
        self.records
            .entry(context.account.id)
            .or_default()
            .of(context.kind)
    }

    /// `GET /api/v4/{kind}?page=&limit=`: oldest first; 204 with no body past the last page.
    fn list(&mut self, context: &Context, query: &str) -> Response {
        let mut page = 1;
        let mut limit = DEFAULT_LIMIT;
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let number = value.parse::<usize>().ok().filter(|n| *n > 0);
            match (key.as_ref(), number) {
                ("page", Some(n)) => page = n,
                // amoCRM caps the page size rather than refusing a larger one.
                ("limit", Some(n)) => limit = n.min(MAX_BATCH),
                ("page" | "limit", None) => {
                    return bad_request("`page` and `limit` must be positive integers");
                }
                _ => {}
            }
        }
        let records = self.records(context);
        let skip = (page - 1).saturating_mul(limit);
        let items: Vec<Value> = records
            .values()
            .skip(skip)
            .take(limit)
            .cloned()
            .map(Value::Object)
            .collect();
        if items.is_empty() {
            return StatusCode::NO_CONTENT.into_response();
        }
        let mut links = Map::new();
        links.insert("self".into(), context.page_href(page, limit));
        if records.len() > skip + items.len() {
            links.insert("next".into(), context.page_href(page + 1, limit));
        }
        if page > 1 {
            links.insert("prev".into(), context.page_href(page - 1, limit));
        }
        hal(json!({
            "_page": page,
            "_links": links,
            "_embedded": { context.kind.name(): items },
        }))
    }

    /// `GET /api/v4/{kind}/{id}`: 204 for an id the account does not have, as amoCRM answers.
    fn get(&mut self, context: &Context, id: &str) -> Response {
        let record = id
            .parse::<i64>()
            .ok()
            .and_then(|id| self.records(context).get(&id).cloned());
        match record {
            Some(record) => hal(Value::Object(record)),
            None => StatusCode::NO_CONTENT.into_response(),
        }
    }

    /// `POST /api/v4/{kind}`: an array of new entities; each answer echoes its `request_id`
    /// (by default the entity's index in the array, as amoCRM does).
    fn create(&mut self, context: &Context, body: &[u8]) -> Response {
        let items = match parse_batch(body) {
            Ok(items) => items,
            Err(detail) => return bad_request(detail),
        };
        let mut created = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            let request_id = match item.get("request_id") {
                Some(Value::String(id)) => id.clone(),
                Some(other) if !other.is_null() => other.to_string(),
                _ => index.to_string(),
            };
            let id = FIRST_ID + self.issued_ids;
            self.issued_ids += 1;
            let mut record = Map::new();
            record.insert("id".into(), id.into());
            record.insert("name".into(), "".into());
            if matches!(context.kind, Kind::Leads) {
                record.insert("price".into(), 0.into());
            }
            record.extend(writable_fields(item));
            record.insert("account_id".into(), context.account.id.into());
            record.insert("created_at".into(), context.now.into());
            record.insert("updated_at".into(), context.now.into());
            let link = json!({ "self": { "href": context.record_href(id) } });
            record.insert("_links".into(), link.clone());
            self.records(context).insert(id, record);
            created.push(json!({ "id": id, "request_id": request_id, "_links": link }));
        }
        hal(json!({
            "_links": { "self": { "href": context.collection_href() } },
            "_embedded": { context.kind.name(): created },
        }))
    }

    /// `PATCH /api/v4/{kind}`: an array of changes, each naming its entity's `id`. Nothing
    /// changes unless every id is the account's.
    fn update_many(&mut self, context: &Context, body: &[u8]) -> Response {
        let items = match parse_batch(body) {
            Ok(items) => items,
            Err(detail) => return bad_request(detail),
        };
        let records = self.records(context);
        let mut unknown = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let id = item.get("id").and_then(Value::as_i64);
            if !id.is_some_and(|id| records.contains_key(&id)) {
                unknown.push(json!({
                    "request_id": index.to_string(),
                    "errors": [{
                        "code": "NotFound",
                        "path": "id",
                        "detail": "No entity with this id in the account",
                    }],
                }));
            }
        }
        if !unknown.is_empty() {
            return validation_failed(unknown);
        }
        let updated: Vec<Value> = items
            .into_iter()
            .filter_map(|item| {
                let id = item.get("id").and_then(Value::as_i64)?;
                Some(update_record_fields(records, context, id, item))
            })
            .collect();
        hal(json!({
            "_links": { "self": { "href": context.collection_href() } },
            "_embedded": { context.kind.name(): updated },
        }))
    }

    /// `PATCH /api/v4/{kind}/{id}`: one object of changes; 404 for an id the account does not
    /// have.
    fn update_one(&mut self, context: &Context, id: &str, body: &[u8]) -> Response {
        let Ok(Value::Object(item)) = serde_json::from_slice::<Value>(body) else {
            return bad_request("The request body must be a JSON object");
        };
        let records = self.records(context);
        match id.parse::<i64>().ok().filter(|id| records.contains_key(id)) {
            Some(id) => hal(update_record_fields(records, context, id, item)),
            None => problem(
                StatusCode::NOT_FOUND,
                "Not Found",
                "No entity with this id in the account",
            ),
        }
    }
}

/// Applies changes to a record known to exist; returns amoCRM's short answer for it.
fn update_record_fields(
    records: &mut BTreeMap<i64, Map<String, Value>>,
    context: &Context,
    id: i64,
    changes: Map<String, Value>,
) -> Value {
    if let Some(record) = records.get_mut(&id) {
        record.extend(writable_fields(changes));
        record.insert("updated_at".into(), context.now.into());
    }
    json!({
        "id": id,
        "updated_at": context.now,
        "_links": { "self": { "href": context.record_href(id) } },
    })
}

fn writable_fields(item: Map<String, Value>) -> impl Iterator<Item = (String, Value)> {
    item.into_iter()
        .filter(|(key, _)| !READ_ONLY_FIELDS.contains(&key.as_str()))
}

/// A JSON array of 1 to 250 objects, or why not (the detail of amoCRM's 400).
fn parse_batch(body: &[u8]) -> Result<Vec<Map<String, Value>>, &'static str> {
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(body) else {
        return Err("The request body must be a JSON array");
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err("Send 1 to 250 entities per request");
    }
    items
        .into_iter()
        .map(|item| match item {
            Value::Object(fields) => Ok(fields),
            _ => Err("Every entity must be a JSON object"),
        })
        .collect()
}

fn hal(body: Value) -> Response {
    ([(CONTENT_TYPE, "application/hal+json")], axum::Json(body)).into_response()
}

/// amoCRM's problem+json outside OAuth.
fn problem(status: StatusCode, title: &str, detail: &str) -> Response {
    let body = json!({
        "title": title,
        "type": format!("https://httpstatus.es/{}", status.as_u16()),
        "status": status.as_u16(),
        "detail": detail,
    });
    problem_response(status, body)
}

fn bad_request(detail: &str) -> Response {
    problem(StatusCode::BAD_REQUEST, "Bad Request", detail)
}

/// amoCRM's 400 for entities it refused, one entry per entity with its `request_id`.
fn validation_failed(errors: Vec<Value>) -> Response {
    let body = json!({
        "validation-errors": errors,
        "title": "Bad Request",
        "type": "https://httpstatus.es/400",
        "status": 400,
        "detail": "Request validation failed",
    });
    problem_response(StatusCode::BAD_REQUEST, body)
}

fn problem_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(CONTENT_TYPE, "application/problem+json")],
        axum::Json(body),
    )
        .into_response()
}
