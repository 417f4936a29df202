//! The `qwen-run` command line.

mod args;
mod bench;
mod chat;
mod fidelity;
mod log_file;
mod ollama_env;
mod run;
mod serve;
mod template;

pub use args::{
    default_prompt_cache_dir, expand_llama_flags, BenchArgs, ChatArgs, Cli, Command,
    ContextOverflow, FidelityArgs, ModelArgs, RunArgs, SamplingArgs, TemplateArgs, TemplateCmdArgs,
    TextArgs,
};
pub use serve::ServeArgs;

use clap::Parser;

/// Parses the command line and runs it; returns the process exit code. Every failure is one
/// readable paragraph on stderr and exit code 1, never a panic or a backtrace.
pub fn main() -> i32 {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error in qwen-run: {info}. Please report this with the command you ran.");
    }));
    let args = match expand_llama_flags(std::env::args_os()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    // a forced kernel level this CPU lacks (or a misspelt one) is refused, not quietly replaced
    if let Err(e) = qwen_run_kernels::Backend::configured() {
        eprintln!("error: {e}");
        return 1;
    }
    let log_copy = match cli.model_args().and_then(|m| m.log_file.as_ref()) {
        Some(path) => match log_file::start(path) {
            Ok(copy) => Some(copy),
            Err(e) => {
                eprintln!("error: {e:#}");
                return 1;
            }
        },
        None => None,
    };
    let result = std::panic::catch_unwind(|| match cli.command {
        Some(Command::Run(args)) => run_or_chat(&args),
        Some(Command::Bench(args)) => bench::bench(&args),
        Some(Command::Chat(args)) => chat::chat(&args),
        Some(Command::Serve(args)) => args.server_options().and_then(crate::server::serve),
        Some(Command::Fidelity(args)) => fidelity::fidelity(&args),
        Some(Command::Template(args)) => template::template(&args),
        None => run_or_chat(&cli.run),
    });
    let code = match result {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            1
        }
        Err(_) => 1,
    };
    drop(log_copy);
    code
}

/// `run`, or with -cnv/-i the chat.
fn run_or_chat(args: &RunArgs) -> anyhow::Result<()> {
    if args.conversation {
        chat::chat(&args.to_chat()?)
    } else {
        run::run(args)
    }
}
