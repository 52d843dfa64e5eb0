//! The `amoauth` binary: everything lives in the library.

/// A request allocates a few dozen small blocks; mimalloc serves them in about half of glibc
/// malloc's time (BENCHMARKS.md). The library leaves the allocator to the program embedding it.
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
