//! The integration suite: one binary, real sockets, real SQLite files.

mod cli;
mod flow;
mod logs;
mod support;
