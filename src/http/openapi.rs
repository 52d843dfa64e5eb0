//! The OpenAPI 3.1 document of the JSON API, served at `/api/v1/openapi.json`. It states
//! every constraint the server enforces, so a schema-driven fuzzer (schemathesis, in CI) can
//! hold the server to it; the allowed return origins and amoCRM domains come from the
//! configuration. A test checks that every `/api/` route of the router is described here.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::AppState;
use super::api::MAX_ACCOUNT;
use crate::amocrm::Platform;
use crate::flow::MAX_EXTERNAL_ID;

/// No NUL anywhere: PostgreSQL text cannot hold one, so the server refuses it everywhere.
const NO_NUL: &str = "^[^\\u0000]*$";

/// What the document depends on in the configuration.
pub struct Contract<'a> {
    /// AMOAUTH_BASE_PATH without its trailing slash ("" or e.g. "/amocrm").
    pub base_path: &'a str,
    /// AMOAUTH_RETURN_ORIGINS, canonical (`https://app.example.com`).
    pub return_origins: &'a [String],
    /// Every configured platform's account domains, lowercase.
    pub account_domains: &'a [String],
    /// The configured platforms (`amocrm`, `kommo`), amoCRM's first.
    pub platforms: &'a [&'static str],
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    })
}

/// An error response that always carries `header` (e.g. `Retry-After`).
fn error_response_with(description: &str, header: &str, header_description: &str) -> Value {
    let mut response = error_response(description);
    response["headers"] = json!({
        header: { "required": true, "description": header_description, "schema": { "type": "string" } }
    });
    response
}

/// Responses every operation may answer with, besides its own.
fn common_responses() -> Vec<(&'static str, Value)> {
    vec![
        (
            "429",
            error_response_with(
                "Over AMOAUTH_RATE_LIMIT for this client IP.",
                "Retry-After",
                "Seconds to wait.",
            ),
        ),
        (
            "504",
            error_response("amoauth did not finish the request within its timeout."),
        ),
    ]
}

/// `operation` with the common responses, and the API key's 401, added.
fn operation(mut operation: Value, secured: bool) -> Value {
    let responses = operation["responses"].as_object_mut().expect("responses");
    for (status, response) in common_responses() {
        responses.entry(status).or_insert(response);
    }
    if secured {
        responses.insert(
            "401".into(),
            error_response_with(
                "No active API key in `Authorization: Bearer`.",
                "WWW-Authenticate",
                "`Bearer`.",
            ),
        );
    }
    operation
}

/// The gateway: the same operation under every method it forwards.
fn gateway_operations() -> Value {
    let operation = operation(
        json!({
            "summary": "Call amoCRM's API for the account: paced, with its access token",
            "description": "Forwards the method, query, headers (not Authorization, cookies or hop-by-hop ones) and body (at most 2 MiB) to the account's current host, at most AMOAUTH_PROXY_RATE requests a second per account across replicas, and answers with amoCRM's status, headers (not Set-Cookie) and body. amoauth's own errors are the JSON error.",
            "parameters": [
                {
                    "name": "account", "in": "path", "required": true,
                    "description": "The amoCRM account id or subdomain (or host).",
                    "schema": { "type": "string", "minLength": 1, "maxLength": MAX_ACCOUNT, "pattern": NO_NUL }
                },
                {
                    "name": "path", "in": "path", "required": true,
                    "description": "amoCRM's API path, e.g. `api/v4/leads`: `api/v4/…` or `api/v2/…`, with `/` between segments; never the OAuth endpoints, no `.`/`..`/empty segments or encoded `/`, `\\`, `.`.",
                    "schema": { "type": "string", "pattern": "^api/v[24]/[^\\u0000]+$" }
                }
            ],
            "responses": {
                "default": { "description": "amoCRM's answer, passed on: its status, headers and body." },
                "400": error_response("path_not_forwarded or path_refused: not an amoCRM API path, or a traversal; or a malformed account."),
                "404": error_response("No connection for this account."),
                "409": error_response("needs_reauth or disconnected: an admin must connect the account again."),
                "413": error_response("The body exceeds 2 MiB."),
                "429": error_response_with("rate_limited: the account's pace is full for longer than AMOAUTH_PROXY_MAX_WAIT (amoauth's answer; amoCRM was not called), or over AMOAUTH_RATE_LIMIT.", "Retry-After", "Seconds to wait."),
                "502": error_response("amoCRM could not be reached, or refused the token refresh."),
                "503": error_response_with("circuit_open: amoCRM answered 403 repeatedly and calls are paused; or refresh_backoff, or the database is in the way.", "Retry-After", "Seconds to wait."),
                "504": error_response("amoCRM did not answer in time.")
            }
        }),
        true,
    );
    let mut operations = serde_json::Map::new();
    for method in ["get", "post", "patch", "put", "delete"] {
        operations.insert(method.into(), operation.clone());
    }
    Value::Object(operations)
}

/// `text` matched literally in a regular expression.
fn regex_literal(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\\' | '^' | '$' | '.' | '|' | '?' | '*' | '+' | '(' | ')' | '[' | ']' | '{' | '}' => {
                format!("\\{c}")
            }
            c => c.to_string(),
        })
        .collect()
}

/// `return_url`: an http(s) URL on an allowed origin, without control characters.
fn return_url_schema(origins: &[String]) -> Value {
    if origins.is_empty() {
        return json!({
            "not": {},
            "description": "AMOAUTH_RETURN_ORIGINS is empty, so no return URL is allowed (422)."
        });
    }
    let origins: Vec<String> = origins.iter().map(|o| regex_literal(o)).collect();
    json!({
        "type": "string",
        "pattern": format!(
            "^(?:{})(?:[/?#][^\\u0000-\\u001f\\u007f-\\u009f]*)?$",
            origins.join("|")
        ),
        "description": "A URL on an origin in AMOAUTH_RETURN_ORIGINS, without control characters; anything else is refused with 422."
    })
}

/// `subdomain`: empty (none), an account name, or an account host on an allowed domain.
fn subdomain_schema(domains: &[String]) -> Value {
    let domains: Vec<String> = domains.iter().map(|d| regex_literal(d)).collect();
    json!({
        "type": "string",
        "pattern": format!(
            "^(?:[a-z0-9](?:[a-z0-9-]{{0,61}}[a-z0-9])?(?:\\.(?:{}))?)?$",
            domains.join("|")
        ),
        "description": "The account to preselect: a name such as fastis02 or a host such as fastis02.amocrm.ru; empty for none. Not null."
    })
}

pub fn document(contract: &Contract) -> Value {
    let external_id = json!({
        "type": "string", "minLength": 1, "maxLength": MAX_EXTERNAL_ID, "pattern": NO_NUL,
        "description": "The host app's tenant id: 1 to 255 characters (not bytes), no NUL."
    });
    let mut document = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "amoauth",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Fresh amoCRM access tokens and connect links for the host application's services. Every error under /api/, including an unknown route (404) and a method a route does not answer (405, with `Allow`), is the JSON `Error` with `Content-Type: application/json`."
        },
        "security": [{ "apiKey": [] }],
        "paths": {
            "/api/v1/connections": {
                "get": operation(json!({
                    "summary": "List connections (never tokens)",
                    "parameters": [{
                        "name": "external_id", "in": "query", "required": false,
                        "description": "Only the connections of this tenant of the host app. At most once.",
                        "schema": external_id
                    }],
                    "responses": {
                        "200": {
                            "description": "Connections.",
                            "content": { "application/json": { "schema": {
                                "type": "array", "items": { "$ref": "#/components/schemas/Connection" }
                            } } }
                        },
                        "400": error_response("A malformed query: `external_id` repeated, empty, too long or holding NUL."),
                        "503": error_response_with("The database is unavailable.", "Retry-After", "Seconds to wait.")
                    }
                }), true)
            },
            "/api/v1/connections/{account}/token": {
                "get": operation(json!({
                    "summary": "A valid access token, refreshed first when close to expiry",
                    "parameters": [{
                        "name": "account", "in": "path", "required": true,
                        "description": "The account id or subdomain (or host). With both amoCRM and Kommo configured, an id or subdomain both platforms have is answered 409 ambiguous_account; qualify it with its platform: `kommo:31337001`, `amocrm:31337001`.",
                        "schema": { "type": "string", "minLength": 1, "maxLength": MAX_ACCOUNT, "pattern": NO_NUL }
                    }],
                    "responses": {
                        "200": {
                            "description": "A usable access token.",
                            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Token" } } }
                        },
                        "400": error_response("A malformed account: not UTF-8, too long or holding NUL."),
                        "404": error_response("No connection for this account."),
                        "409": error_response("needs_reauth or disconnected: an admin must connect the account again; ambiguous_account: the id or subdomain is connected on both platforms, ask for `amocrm:…` or `kommo:…`."),
                        "500": error_response("The stored tokens cannot be decrypted with the configured key (corrupt)."),
                        "502": error_response("amoCRM refused or failed the refresh; the stored pair is kept."),
                        "503": error_response_with("refresh_backoff: the access token expired and refreshes are backing off after amoCRM failed them (`reason` says why; no call to amoCRM was made); or the database, or another replica's refresh, is in the way. Retry after `Retry-After`.", "Retry-After", "Seconds to wait."),
                        "504": error_response("amoCRM did not answer the refresh in time.")
                    }
                }), true)
            },
            "/api/v1/connections/{account}/proxy/{path}": gateway_operations(),
            "/api/v1/connect-links": {
                "post": operation(json!({
                    "summary": "Start a connection for one tenant of the host app",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": {
                        "type": "object",
                        "required": ["external_id", "return_url"],
                        "properties": {
                            "external_id": external_id,
                            "return_url": return_url_schema(contract.return_origins),
                            "mode": { "type": "string", "enum": ["popup", "post_message"], "default": "popup" },
                            "subdomain": subdomain_schema(contract.account_domains),
                            "platform": {
                                "type": "string", "enum": contract.platforms,
                                "description": "The platform whose integration the link is for; default: the only one configured, or amocrm when both are."
                            }
                        },
                        "additionalProperties": true,
                        "description": "Other members are ignored; a member may appear once. At most 16 KiB."
                    } } } },
                    "responses": {
                        "201": {
                            "description": "Open `url` in the user's browser before `expires_at`.",
                            "content": { "application/json": { "schema": {
                                "type": "object",
                                "required": ["url", "expires_at"],
                                "properties": {
                                    "url": { "type": "string", "format": "uri" },
                                    "expires_at": { "type": "string", "format": "date-time" }
                                }
                            } } }
                        },
                        "400": error_response("A malformed body: not JSON, a member missing, repeated or of the wrong type, or a value out of its bounds."),
                        "413": error_response("The body is over 16 KiB."),
                        "415": error_response("The body is not sent as `Content-Type: application/json`."),
                        "422": error_response("return_url is not on an allowed origin."),
                        "503": error_response_with("The database is unavailable.", "Retry-After", "Seconds to wait.")
                    }
                }), true)
            },
            "/api/v1/openapi.json": {
                "get": operation(json!({
                    "summary": "This document",
                    "security": [],
                    "responses": { "200": {
                        "description": "OpenAPI 3.1 JSON.",
                        "content": { "application/json": { "schema": { "type": "object" } } }
                    } }
                }), false)
            }
        },
        "components": {
            "securitySchemes": {
                "apiKey": { "type": "http", "scheme": "bearer", "description": "An API key from `amoauth api-key create NAME`." }
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {
                        "error": { "type": "string", "description": "A stable code, e.g. invalid_request, unauthorized, not_found, method_not_allowed, payload_too_large, unsupported_media_type, rate_limited, timeout." },
                        "message": { "type": "string", "description": "What went wrong and what to do." },
                        "reason": { "type": "string", "description": "Why, for needs_reauth (amoCRM's words) and refresh_backoff (the last refresh error)." }
                    }
                },
                "Connection": {
                    "type": "object",
                    "required": ["platform", "account_id", "external_id", "account_name", "subdomain", "domain", "status", "expires_at", "last_refresh_at", "last_error"],
                    "properties": {
                        "platform": { "type": "string", "enum": ["amocrm", "kommo"] },
                        "account_id": { "type": ["integer", "null"] },
                        "external_id": { "type": ["string", "null"] },
                        "account_name": { "type": ["string", "null"] },
                        "subdomain": { "type": "string" },
                        "domain": { "type": "string" },
                        "status": { "type": "string", "enum": ["active", "needs_reauth", "disconnected"] },
                        "expires_at": { "type": "string", "format": "date-time" },
                        "last_refresh_at": { "type": ["string", "null"], "format": "date-time" },
                        "last_error": { "type": ["string", "null"] }
                    }
                },
                "Token": {
                    "type": "object",
                    "required": ["platform", "account_id", "subdomain", "domain", "access_token", "expires_at"],
                    "properties": {
                        "platform": { "type": "string", "enum": ["amocrm", "kommo"] },
                        "account_id": { "type": ["integer", "null"] },
                        "subdomain": { "type": "string" },
                        "domain": { "type": "string" },
                        "access_token": { "type": "string" },
                        "expires_at": { "type": "string", "format": "date-time" }
                    }
                }
            }
        }
    });
    if !contract.base_path.is_empty() {
        // The paths above are relative to the base path the site serves amoauth under.
        document["servers"] = json!([{ "url": contract.base_path }]);
    }
    document
}

pub async fn serve(State(state): State<AppState>) -> Json<Value> {
    Json(document(&Contract {
        base_path: &state.base_path,
        return_origins: state.flow.return_origins(),
        account_domains: &state.flow.account_domains(),
        platforms: &state
            .flow
            .platforms()
            .into_iter()
            .map(Platform::as_str)
            .collect::<Vec<_>>(),
    }))
}
