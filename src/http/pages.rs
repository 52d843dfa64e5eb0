//! Server-rendered HTML (auto-escaped by maud), in Russian or English.

use axum::http::HeaderMap;
use axum::http::header::ACCEPT_LANGUAGE;
use maud::{DOCTYPE, Markup, PreEscaped, html};

use crate::amocrm::{AmoError, Platform, ProblemKind};
use crate::flow::{Connected, Failure};
use std::collections::HashMap;

use super::local;
use super::suspicion::Suspicion;
use crate::store::{AttemptRecord, ConnectionRow, ConnectionStatus, Timestamp};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    Ru,
    En,
}

impl Lang {
    /// Russian unless the browser prefers English over Russian.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let Some(value) = headers.get(ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()) else {
            return Self::Ru;
        };
        let mut best = (Self::Ru, 0.0f32);
        for (index, item) in value.split(',').enumerate().take(20) {
            let mut parts = item.trim().split(';');
            let tag = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let quality = parts
                .find_map(|p| p.trim().strip_prefix("q="))
                .and_then(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0)
                // Earlier entries win ties, as the browser listed them first.
                - index as f32 * 1e-4;
            let lang = if tag == "ru" || tag.starts_with("ru-") {
                Self::Ru
            } else if tag == "en" || tag.starts_with("en-") {
                Self::En
            } else {
                continue;
            };
            if quality > best.1 {
                best = (lang, quality);
            }
        }
        best.0
    }

    fn pick(self, ru: &'static str, en: &'static str) -> &'static str {
        match self {
            Self::Ru => ru,
            Self::En => en,
        }
    }

    fn code(self) -> &'static str {
        self.pick("ru", "en")
    }
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#1d2733;line-height:1.5}\
h1{font-size:1.5rem}.card{border:1px solid #d8dee6;border-radius:.5rem;padding:1rem 1.25rem;margin:1rem 0}\
.ok{border-color:#2e9d5b;background:#f0faf4}.err{border-color:#d9534f;background:#fdf3f3}\
.button,button{display:inline-block;background:#2f6fdb;color:#fff;border:0;border-radius:.4rem;padding:.55rem 1rem;text-decoration:none;font-size:1rem;cursor:pointer}\
.button.secondary,button.secondary{background:#6b7785}table{border-collapse:collapse;width:100%;font-size:.9rem}\
td,th{border-bottom:1px solid #e3e8ee;padding:.4rem;text-align:left;vertical-align:top}.low{color:#b3261e;font-weight:600}\
code{background:#f2f4f7;padding:0 .25rem;border-radius:.2rem}input{font-size:1rem;padding:.45rem;width:100%;max-width:28rem;box-sizing:border-box}\
.muted{color:#6b7785;font-size:.85rem}tr.suspicious{background:#fff6e5}form.inline{display:inline}.toolbar{margin:1rem 0}.table-wrap{overflow-x:auto}";

/// `'sha256-…'` of an inline element's exact text, for the CSP.
fn csp_hash(text: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The pages' Content-Security-Policy: nothing loads from elsewhere, the one inline style and
/// (when given) one inline script run by hash, no framing, forms post only here.
pub fn content_security_policy(script: Option<&str>) -> String {
    let script_src = script.map_or_else(|| "'none'".to_owned(), csp_hash);
    format!(
        "default-src 'none'; style-src {}; script-src {script_src}; img-src 'self'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        csp_hash(STYLE)
    )
}

fn layout(lang: Lang, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang=(lang.code()) {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                title { (title) " · amoauth" }
                style { (PreEscaped(STYLE)) }
            }
            body { (body) }
        }
    }
}

pub fn connected(lang: Lang, connected: &Connected) -> Markup {
    let title = match connected.platform {
        Platform::Amocrm => lang.pick(
            "amoCRM успешно подключена!",
            "amoCRM connected successfully!",
        ),
        Platform::Kommo => lang.pick("Kommo успешно подключена!", "Kommo connected successfully!"),
    };
    layout(
        lang,
        title,
        html! {
            div.card.ok {
                h1 { (title) }
                p {
                    (lang.pick("Аккаунт", "Account")) ": " strong { (connected.account_name) }
                    " (" code { (connected.domain) } ", ID " (connected.account_id) ")"
                }
                p { (lang.pick("Токены сохранены в зашифрованном виде и будут обновляться автоматически.",
                               "The tokens are stored encrypted and will be kept fresh automatically.")) }
            }
            p { a.button href=(local("/")) { (lang.pick("На главную", "Go to the dashboard")) } }
        },
    )
}

/// Title, explanation and advice for each way a callback can fail.
fn callback_error_text(lang: Lang, err: &Failure) -> (&'static str, String, &'static str) {
    let retry = lang.pick(
        "Начните подключение заново: нажмите «Попробовать снова».",
        "Start the connection again with “Try again”.",
    );
    match err {
        Failure::AccessDenied => (
            lang.pick("Доступ не предоставлен", "Access was denied"),
            lang.pick("В amoCRM нажали «Отказать»: доступ к аккаунту не выдан.",
                      "Access was denied in amoCRM: the integration was not allowed into the account.").into(),
            lang.pick("Если это ошибка, подключитесь снова и нажмите «Разрешить».",
                      "If that was a mistake, connect again and choose Allow."),
        ),
        Failure::AmoCrmReportedError(code) => (
            lang.pick("amoCRM сообщила об ошибке", "amoCRM reported an error"),
            format!("{}: {code}", lang.pick("Код ошибки", "Error code")),
            retry,
        ),
        Failure::InvalidRequest(why) => (
            lang.pick("Неверный запрос", "Invalid request"),
            format!("{}: {why}", lang.pick("Запрос не похож на ответ amoCRM", "This does not look like a reply from amoCRM")),
            retry,
        ),
        Failure::BadReferer => (
            lang.pick("Недопустимый адрес аккаунта", "Account address not allowed"),
            lang.pick("Параметр referer не является адресом аккаунта amoCRM из списка AMOCRM_DOMAINS. Запрос в amoCRM не отправлялся.",
                      "The referer parameter is not an amoCRM account host on the AMOCRM_DOMAINS list. Nothing was sent to amoCRM.").into(),
            retry,
        ),
        Failure::RefererMismatch { referer, expected } => (
            lang.pick("Другой аккаунт amoCRM", "A different amoCRM account"),
            format!(
                "{} {expected}, {} {referer}. {}",
                lang.pick("Подключение было начато для аккаунта", "The connection was started for the account"),
                lang.pick("но amoCRM вернула аккаунт", "but amoCRM returned the account"),
                lang.pick("Запрос в amoCRM не отправлялся.", "Nothing was sent to amoCRM."),
            ),
            lang.pick("Начните подключение заново и выберите в amoCRM тот же аккаунт.",
                      "Start again and choose the same account in amoCRM."),
        ),
        Failure::AccountTaken => (
            lang.pick("Аккаунт уже подключён", "Account already connected"),
            lang.pick("Этот аккаунт amoCRM уже подключён к другому пользователю приложения (external_id). Ничего не изменено.",
                      "This amoCRM account is already connected for another user of the app (external_id). Nothing was changed.").into(),
            lang.pick("Попросите администратора amoauth отключить аккаунт на панели, затем подключите его снова.",
                      "Ask the amoauth administrator to disconnect the account on the dashboard, then connect it again."),
        ),
        Failure::UnknownState => (
            lang.pick("Ссылка не распознана", "Unknown link"),
            lang.pick("Параметр state не найден: эта ссылка не была выдана этим сервером.",
                      "The state parameter is unknown: this link was not issued by this server.").into(),
            retry,
        ),
        Failure::UsedState => (
            lang.pick("Ссылка уже использована", "Link already used"),
            lang.pick("Эта ссылка подключения уже была использована; повторно её использовать нельзя.",
                      "This connection link was already used and cannot be used again.").into(),
            lang.pick("Если подключение не удалось, начните заново.", "If the connection did not work, start again."),
        ),
        Failure::ExpiredState => (
            lang.pick("Ссылка устарела", "Link expired"),
            lang.pick("Подключение не было завершено вовремя, и ссылка истекла.",
                      "The connection was not completed in time and its link expired.").into(),
            retry,
        ),
        Failure::WidgetInstallsOff => (
            lang.pick("Установка виджета отключена", "Widget installs are off"),
            lang.pick("Этот сервер не принимает установки из маркетплейса (AMOAUTH_WIDGET_INSTALLS=off).",
                      "This server does not accept marketplace installs (AMOAUTH_WIDGET_INSTALLS=off).").into(),
            lang.pick("Подключите аккаунт через кнопку на сайте.", "Connect the account with the button on the site."),
        ),
        Failure::Exchange { host, source } => (
            amo_title(lang, source),
            format!("{} {host}: {}", lang.pick("Обмен кода на токены в", "Exchanging the code for tokens at"), amo_detail(lang, source)),
            amo_advice(lang, source),
        ),
        Failure::AccountLookup { host, source } => (
            amo_title(lang, source),
            format!("{} {host}: {}", lang.pick("Запрос данных аккаунта в", "Looking up the account at"), amo_detail(lang, source)),
            amo_advice(lang, source),
        ),
        Failure::Database => (
            lang.pick("База данных недоступна", "Database unavailable"),
            lang.pick("Не удалось сохранить подключение: база данных amoauth недоступна. Ничего не сохранено.",
                      "The connection could not be saved: amoauth's database is unavailable. Nothing was stored.").into(),
            lang.pick("Повторите попытку через минуту; если ошибка повторяется, сообщите администратору.",
                      "Try again in a minute; if it keeps failing, tell the administrator."),
        ),
    }
}

fn amo_title(lang: Lang, err: &AmoError) -> &'static str {
    match err {
        AmoError::Timeout(_) => lang.pick(
            "amoCRM не ответила вовремя",
            "amoCRM did not answer in time",
        ),
        AmoError::Unreachable { .. } => lang.pick("amoCRM недоступна", "amoCRM is unreachable"),
        AmoError::Rejected { .. } => {
            lang.pick("amoCRM отклонила запрос", "amoCRM rejected the request")
        }
        _ => lang.pick("Ошибка amoCRM", "amoCRM failed"),
    }
}

fn amo_detail(lang: Lang, err: &AmoError) -> String {
    match err {
        AmoError::Timeout(limit) => format!(
            "{} {limit:?}",
            lang.pick("нет ответа за", "no answer within")
        ),
        AmoError::Unreachable { .. } => lang
            .pick("не удалось установить соединение", "could not connect")
            .into(),
        AmoError::Rejected { status, problem } => format!("HTTP {status}, {}", problem.summary()),
        AmoError::Http { status } => format!("HTTP {status}"),
        AmoError::Redirect { status } => format!("HTTP {status} (redirect)"),
        AmoError::HostNotAllowed { host } => format!(
            "{host}: {}",
            lang.pick("не адрес аккаунта amoCRM", "not an amoCRM account host")
        ),
        AmoError::BadResponse(what) => what.clone(),
    }
}

fn amo_advice(lang: Lang, err: &AmoError) -> &'static str {
    match err.problem_kind() {
        Some(ProblemKind::CodeRevoked | ProblemKind::CodeExpired | ProblemKind::CodeInvalid) => lang.pick(
            "Код авторизации недействителен (использован или истёк). Начните подключение заново.",
            "The authorization code is no longer valid (used or expired). Start the connection again.",
        ),
        Some(ProblemKind::InvalidClient) => lang.pick(
            "Проверьте AMOCRM_CLIENT_ID и AMOCRM_CLIENT_SECRET: amoCRM их не приняла.",
            "Check AMOCRM_CLIENT_ID and AMOCRM_CLIENT_SECRET: amoCRM did not accept them.",
        ),
        Some(ProblemKind::RedirectUriMismatch) => lang.pick(
            "AMOCRM_REDIRECT_URI должен побайтно совпадать с адресом в настройках интеграции.",
            "AMOCRM_REDIRECT_URI must match the integration's Redirect URI byte for byte.",
        ),
        _ => lang.pick(
            "Ничего не сохранено. Повторите подключение через несколько минут.",
            "Nothing was stored. Try connecting again in a few minutes.",
        ),
    }
}

pub fn callback_error(lang: Lang, err: &Failure) -> Markup {
    let (title, detail, advice) = callback_error_text(lang, err);
    layout(
        lang,
        title,
        html! {
            div.card.err {
                h1 { (title) }
                p { (detail) }
                p { (advice) }
                p.muted { (lang.pick("Код причины", "Reason code")) ": " code { (err.reason().as_str()) } }
            }
            p { a.button href="/amocrm/install" { (lang.pick("Попробовать снова", "Try again")) } }
        },
    )
}

/// A result address that expired or was altered: nothing failed, the page is just gone.
pub fn result_gone(lang: Lang) -> Markup {
    let title = lang.pick(
        "Результат больше недоступен",
        "This result is no longer available",
    );
    layout(
        lang,
        title,
        html! {
            div.card {
                h1 { (title) }
                p { (lang.pick(
                    "Страница с итогом подключения показывается недолго после него. Состояние подключений и последние попытки — на главной странице.",
                    "The page with a connection's outcome is shown only for a short while after it. See the dashboard for the connections and the recent attempts.")) }
            }
            p { a.button href=(local("/")) { (lang.pick("На главную", "Go to the dashboard")) } }
        },
    )
}

/// A plain error page for other routes (bad install parameters, database outages).
pub fn error(lang: Lang, title_ru: &'static str, title_en: &'static str, detail: &str) -> Markup {
    let title = lang.pick(title_ru, title_en);
    layout(
        lang,
        title,
        html! {
            div.card.err { h1 { (title) } p { (detail) } }
            p { a.button href=(local("/")) { (lang.pick("На главную", "Go to the dashboard")) } }
        },
    )
}

/// The last page of a `post_message` connect link: tells the window that opened it how the
/// connection went (only if that window is on `target_origin`) and closes itself. Returns the
/// page and its inline script, whose hash the page's CSP must allow.
pub fn post_message(
    lang: Lang,
    target_origin: &str,
    message: &serde_json::Value,
    fallback: &str,
) -> (Markup, String) {
    // JSON inside <script>: `<` escaped so no value can close the element.
    let script_json = |value: &serde_json::Value| value.to_string().replace('<', "\\u003c");
    let script = format!(
        "if (window.opener) {{ window.opener.postMessage({}, {}); window.close(); }}",
        script_json(message),
        script_json(&serde_json::Value::String(target_origin.to_owned())),
    );
    let title = lang.pick("Подключение завершено", "Connection finished");
    let page = layout(
        lang,
        title,
        html! {
            div.card {
                h1 { (title) }
                p { (lang.pick("Это окно можно закрыть.", "You can close this window.")) }
                p { a.button href=(fallback) { (lang.pick("Вернуться в приложение", "Back to the app")) } }
            }
            script { (PreEscaped(&script)) }
        },
    );
    (page, script)
}

pub fn login(lang: Lang, next: &str, failed: bool) -> Markup {
    let title = lang.pick("Вход администратора", "Administrator login");
    layout(
        lang,
        title,
        html! {
            h1 { (title) }
            @if failed {
                div.card.err { p { (lang.pick("Неверный токен администратора.", "Wrong admin token.")) } }
            }
            form method="post" action=(local("/login")) {
                input type="hidden" name="next" value=(next);
                p {
                    label for="token" { (lang.pick("Токен администратора (AMOAUTH_ADMIN_TOKEN)", "Admin token (AMOAUTH_ADMIN_TOKEN)")) }
                    br;
                    input id="token" type="password" name="token" autocomplete="current-password" required;
                }
                p { button type="submit" { (lang.pick("Войти", "Log in")) } }
            }
        },
    )
}

fn format_time(at: Timestamp) -> String {
    at.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// What the last dashboard action did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    Refreshed,
    RefreshFailed,
    Disconnected,
    NotFound,
}

impl Notice {
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "refreshed" => Some(Self::Refreshed),
            "refresh_failed" => Some(Self::RefreshFailed),
            "disconnected" => Some(Self::Disconnected),
            "not_found" => Some(Self::NotFound),
            _ => None,
        }
    }

    fn text(self, lang: Lang) -> (&'static str, bool) {
        match self {
            Self::Refreshed => (
                lang.pick("Токен обновлён.", "The token was refreshed."),
                true,
            ),
            Self::RefreshFailed => (
                lang.pick(
                    "Обновить токен не удалось; причина — в колонке «Ошибка».",
                    "The refresh failed; see the Last error column.",
                ),
                false,
            ),
            Self::Disconnected => (
                lang.pick(
                    "Подключение отключено, токены удалены.",
                    "Disconnected; the tokens were wiped.",
                ),
                true,
            ),
            Self::NotFound => (
                lang.pick("Подключение не найдено.", "No such connection."),
                false,
            ),
        }
    }
}

fn suspicion_text(lang: Lang, suspicion: Suspicion) -> &'static str {
    match suspicion {
        Suspicion::OtherClient => lang.pick(
            "другой IP или браузер, чем при установке",
            "another IP or browser than its install",
        ),
        Suspicion::RepeatedFailures => lang.pick(
            "повторные ошибки с этого IP",
            "repeated failures from this IP",
        ),
        Suspicion::Replayed => lang.pick("повтор использованной ссылки", "a used link replayed"),
    }
}

fn format_optional_time(at: Option<Timestamp>) -> String {
    at.map(format_time).unwrap_or_else(|| "—".into())
}

#[allow(clippy::too_many_arguments)]
pub fn home(
    lang: Lang,
    connections: &[ConnectionRow],
    attempts: &[AttemptRecord],
    marks: &HashMap<i64, Vec<Suspicion>>,
    now: Timestamp,
    csrf: Option<&str>,
    notice: Option<Notice>,
    paused: &[(Option<i64>, std::time::Duration)],
    platforms: &[Platform],
) -> Markup {
    let title = lang.pick("Подключения amoCRM", "amoCRM connections");
    layout(
        lang,
        title,
        html! {
            h1 { (title) }
            @if let Some(notice) = notice {
                @let (text, ok) = notice.text(lang);
                div.card.ok[ok].err[!ok] { p { (text) } }
            }
            // The gateway's open circuits: amoCRM answered 403 repeatedly.
            @for (account, left) in paused {
                div.card.err { p {
                    @match account {
                        Some(id) => { (lang.pick("Шлюз API приостановлен для аккаунта ", "API gateway paused for account ")) (id) }
                        None => { (lang.pick("Шлюз API приостановлен для всех аккаунтов (похоже на блокировку IP)", "API gateway paused for all accounts (looks like an IP block)")) }
                    }
                    (lang.pick(": amoCRM отвечает 403; ещё ", ": amoCRM answers 403; for ")) (left.as_secs()) (lang.pick(" с", " s more"))
                } }
            }
            // A div, not a p: a form inside a p closes it in the HTML parser.
            div.toolbar {
                // One button per configured integration; amoCRM's link is the one it always was.
                @for platform in platforms {
                    @match platform {
                        Platform::Amocrm => { a.button href="/amocrm/install" { (lang.pick("Подключить amoCRM", "Connect amoCRM")) } }
                        Platform::Kommo => { a.button href="/amocrm/install?platform=kommo" { (lang.pick("Подключить Kommo", "Connect Kommo")) } }
                    }
                    " "
                }
                " "
                form.inline method="post" action=(local("/logout")) {
                    @if let Some(csrf) = csrf { input type="hidden" name="csrf" value=(csrf); }
                    button.secondary type="submit" { (lang.pick("Выйти", "Log out")) }
                }
            }
            @if connections.is_empty() {
                div.card { p { (lang.pick("Пока нет подключённых аккаунтов.", "No account is connected yet.")) } }
            } @else {
                div.table-wrap { table {
                    tr {
                        th { (lang.pick("Аккаунт", "Account")) } th { (lang.pick("Домен", "Domain")) }
                        th { (lang.pick("Статус", "Status")) } th { (lang.pick("Токен истекает", "Token expires")) }
                        th { (lang.pick("Осталось, ч", "Hours left")) } th { (lang.pick("Обновлён", "Last refresh")) }
                        th { (lang.pick("Ошибка", "Last error")) } th { (lang.pick("Действия", "Actions")) }
                    }
                    @for c in connections {
                        @let hours = (c.expires_at - now).num_minutes() as f64 / 60.0;
                        @let account_id = c.account_id.map(|id| id.to_string()).unwrap_or_default();
                        @let qualified = format!("{}:{account_id}", c.platform);
                        tr {
                            td { (c.account_name.as_deref().unwrap_or("—")) br; span.muted { (c.platform.title()) " · ID " (account_id) } }
                            td { code { (c.domain) } }
                            td class=[(c.status != ConnectionStatus::Active).then_some("low")] { (c.status) }
                            td { (format_time(c.expires_at)) }
                            td class=[(hours < 2.0).then_some("low")] { (format!("{hours:.1}")) }
                            td { (format_optional_time(c.last_refresh_at)) }
                            td.muted { (c.last_error.as_deref().unwrap_or("—")) }
                            td {
                                @if c.account_id.is_some() && c.status != ConnectionStatus::Disconnected {
                                    form.inline method="post" action=(local(&format!("/connections/{qualified}/refresh"))) {
                                        @if let Some(csrf) = csrf { input type="hidden" name="csrf" value=(csrf); }
                                        button type="submit" { (lang.pick("Обновить", "Refresh now")) }
                                    }
                                    " "
                                    form.inline method="post" action=(local(&format!("/connections/{qualified}/disconnect"))) {
                                        @if let Some(csrf) = csrf { input type="hidden" name="csrf" value=(csrf); }
                                        button.secondary type="submit" { (lang.pick("Отключить", "Disconnect")) }
                                    }
                                }
                            }
                        }
                    }
                } }
            }
            h2 { (lang.pick("Последние попытки", "Recent attempts")) }
            div.table-wrap { table {
                tr {
                    th { (lang.pick("Время", "Time")) } th { (lang.pick("Тип", "Kind")) } th { (lang.pick("Итог", "Outcome")) }
                    th { (lang.pick("Причина", "Reason")) } th { "IP" } th { "User-Agent" }
                }
                @for a in attempts {
                    @let suspicious = marks.get(&a.id);
                    tr class=[suspicious.map(|_| "suspicious")] {
                        td { (format_time(a.created_at)) } td { (a.kind) } td { (a.outcome) }
                        td {
                            (a.reason.as_deref().unwrap_or(""))
                            @if let Some(found) = suspicious {
                                @for suspicion in found {
                                    br; span.low { "⚠ " (suspicion_text(lang, *suspicion)) }
                                }
                            }
                        }
                        td { (a.ip.as_deref().unwrap_or("")) }
                        td.muted { (a.user_agent.as_deref().unwrap_or("")) }
                    }
                }
            } }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lang(value: &str) -> Lang {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT_LANGUAGE, value.parse().unwrap());
        Lang::from_headers(&headers)
    }

    #[test]
    fn russian_unless_english_is_preferred() {
        assert_eq!(Lang::from_headers(&HeaderMap::new()), Lang::Ru);
        assert_eq!(lang("en-US,en;q=0.9"), Lang::En);
        assert_eq!(lang("ru-RU,ru;q=0.9,en;q=0.8"), Lang::Ru);
        assert_eq!(lang("de-DE,en;q=0.5"), Lang::En);
        assert_eq!(lang("de-DE"), Lang::Ru);
        assert_eq!(lang("en;q=0.3,ru;q=0.7"), Lang::Ru);
    }

    #[test]
    fn pages_escape_what_they_show() {
        let page = error(Lang::En, "x", "x", "<script>alert(1)</script>").into_string();
        assert!(!page.contains("<script>alert"));
        assert!(page.contains("&lt;script&gt;"));
    }
}
