//! The `amoauth` binary: everything lives in the library.

/// mimalloc rather than glibc's malloc: buffers are freed on other threads than the ones that
/// allocated them (the SQLite writer, the log writer); the flow's CPU shows it (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
