//! The `activator` binary; the library's `app` is the whole of it.

fn main() -> std::process::ExitCode {
    activator::app::main()
}
