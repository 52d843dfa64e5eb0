//! The OpenAPI 3.1 document of the JSON API, served at `/api/v1/openapi.json`. A test checks
//! that every `/api/` route of the router is described here.

use axum::Json;
use serde_json::{Value, json};

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    })
}

pub fn document() -> Value {
    let unauthorized = error_response("No active API key.");
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "amoauth",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Fresh amoCRM access tokens and connect links for the host application's services."
        },
        "security": [{ "apiKey": [] }],
        "paths": {
            "/api/v1/connections": {
                "get": {
                    "summary": "List connections (never tokens)",
                    "parameters": [{
                        "name": "external_id", "in": "query", "required": false,
                        "description": "Only the connections of this tenant of the host app.",
                        "schema": { "type": "string" }
                    }],
                    "responses": {
                        "200": {
                            "description": "Connections.",
                            "content": { "application/json": { "schema": {
                                "type": "array", "items": { "$ref": "#/components/schemas/Connection" }
                            } } }
                        },
                        "401": unauthorized,
                        "503": error_response("The database is unavailable.")
                    }
                }
            },
            "/api/v1/connections/{account}/token": {
                "get": {
                    "summary": "A valid access token, refreshed first when close to expiry",
                    "parameters": [{
                        "name": "account", "in": "path", "required": true,
                        "description": "The amoCRM account id or subdomain.",
                        "schema": { "type": "string" }
                    }],
                    "responses": {
                        "200": {
                            "description": "A usable access token.",
                            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Token" } } }
                        },
                        "401": unauthorized,
                        "404": error_response("No connection for this account."),
                        "409": error_response("needs_reauth or disconnected: an admin must connect the account again."),
                        "502": error_response("amoCRM refused or failed the refresh; the stored pair is kept."),
                        "503": error_response("The database, or another replica's refresh, is in the way; retry."),
                        "504": error_response("amoCRM did not answer the refresh in time.")
                    }
                }
            },
            "/api/v1/connect-links": {
                "post": {
                    "summary": "Start a connection for one tenant of the host app",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": {
                        "type": "object",
                        "required": ["external_id", "return_url"],
                        "properties": {
                            "external_id": { "type": "string", "maxLength": 255 },
                            "return_url": { "type": "string", "format": "uri", "description": "On an origin in AMOAUTH_RETURN_ORIGINS." },
                            "mode": { "type": "string", "enum": ["popup", "post_message"], "default": "popup" },
                            "subdomain": { "type": "string" }
                        }
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
                        "400": error_response("A malformed request."),
                        "401": unauthorized,
                        "422": error_response("return_url is not on an allowed origin."),
                        "503": error_response("The database is unavailable.")
                    }
                }
            },
            "/api/v1/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": { "200": { "description": "OpenAPI 3.1 JSON." } }
                }
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
                        "error": { "type": "string" },
                        "message": { "type": "string" },
                        "reason": { "type": "string", "description": "amoCRM's words, for needs_reauth." }
                    }
                },
                "Connection": {
                    "type": "object",
                    "properties": {
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
                    "required": ["subdomain", "domain", "access_token", "expires_at"],
                    "properties": {
                        "account_id": { "type": ["integer", "null"] },
                        "subdomain": { "type": "string" },
                        "domain": { "type": "string" },
                        "access_token": { "type": "string" },
                        "expires_at": { "type": "string", "format": "date-time" }
                    }
                }
            }
        }
    })
}

pub async fn serve() -> Json<Value> {
    Json(document())
}
