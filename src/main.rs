//! The `amoauth` binary: everything lives in the library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match amoauth::cli::run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One line: the variable or step, and what is wrong.
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
