//! The `amoauth` binary: everything lives in the library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match amoauth::internal::run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One line per problem: the variable or step, and what is wrong.
            for line in format!("{err:#}").lines() {
                eprintln!("error: {line}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
