//! HTML of the sandbox's consent page and its error page, in amoCRM's language and look.

use maud::{DOCTYPE, Markup, html};

use super::SandboxAccount;

const STYLE: &str = "
body { margin: 0; background: #eef2f5; color: #2e3640;
  font: 15px/1.5 'PT Sans', Arial, sans-serif; }
main { max-width: 440px; margin: 64px auto; background: #fff; border-radius: 6px;
  box-shadow: 0 2px 12px rgba(0, 0, 0, .08); padding: 32px; }
.logo { font-weight: 700; font-size: 20px; color: #4c8bf7; margin-bottom: 20px; }
h1 { font-size: 20px; margin: 0 0 12px; }
code { background: #f3f5f7; padding: 1px 5px; border-radius: 3px; word-break: break-all; }
ul { padding-left: 20px; margin: 8px 0 20px; }
label { display: block; font-weight: 700; margin-bottom: 6px; }
select { width: 100%; padding: 8px; font-size: 15px; border: 1px solid #d4d5d8;
  border-radius: 3px; margin-bottom: 24px; }
.buttons { display: flex; gap: 12px; }
button { flex: 1; padding: 10px; font-size: 15px; border-radius: 3px; cursor: pointer;
  border: 1px solid #d4d5d8; background: #fff; color: #2e3640; }
button.allow { background: #4c8bf7; border-color: #4c8bf7; color: #fff; }
.note { margin-top: 24px; font-size: 13px; color: #92989b; }
";

fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="ru" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                style { (STYLE) }
            }
            body {
                main {
                    div.logo { "amoCRM" }
                    (body)
                    p.note { "Это песочница amoauth: настоящий amoCRM не используется." }
                }
            }
        }
    }
}

/// The "grant access" page; its form posts to `/oauth/decide`.
/// A consent page lists at most this many accounts; Allow takes any of the platform's by id.
/// A benchmark's sandbox holds thousands, and rendering them all would be the sandbox's
/// whole cost per flow.
const LISTED_ACCOUNTS: usize = 50;

pub(super) fn consent(
    client_id: &str,
    accounts: &[SandboxAccount],
    state: Option<&str>,
    mode: Option<&str>,
) -> Markup {
    layout(
        "Предоставление доступа",
        html! {
            h1 { "Предоставить доступ" }
            p {
                "Интеграция " code { (client_id) }
                " запрашивает доступ к вашему аккаунту:"
            }
            ul {
                li { "доступ к данным аккаунта" }
                li { "доступ к уведомлениям" }
            }
            form method="post" action="/oauth/decide" {
                input type="hidden" name="client_id" value=(client_id);
                @if let Some(state) = state {
                    input type="hidden" name="state" value=(state);
                }
                @if let Some(mode) = mode {
                    input type="hidden" name="mode" value=(mode);
                }
                label for="account_id" { "Аккаунт" }
                select #account_id name="account_id" {
                    @for account in accounts.iter().take(LISTED_ACCOUNTS) {
                        option value=(account.id) {
                            (account.name) " (" (account.host()) ")"
                        }
                    }
                }
                @if accounts.len() > LISTED_ACCOUNTS {
                    p { "…и ещё " (accounts.len() - LISTED_ACCOUNTS) " аккаунтов (их можно выбрать по id)." }
                }
                div.buttons {
                    button.allow type="submit" name="decision" value="allow" { "Разрешить" }
                    button type="submit" name="decision" value="deny" { "Отказать" }
                }
            }
        },
    )
}

/// A page explaining why the consent flow cannot go on.
pub(super) fn error(message: &str) -> Markup {
    layout(
        "Ошибка",
        html! {
            h1 { "Ошибка" }
            p { (message) }
        },
    )
}
