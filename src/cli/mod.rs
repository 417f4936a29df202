//! The `qwen-run` command line.

mod args;
mod bench;
mod chat;
mod fidelity;
mod run;
mod serve;
mod template;

pub use args::{
    default_prompt_cache_dir, expand_llama_flags, BenchArgs, ChatArgs, Cli, Command,
    ContextOverflow, FidelityArgs, ModelArgs, RunArgs, SamplingArgs, TemplateArgs, TemplateCmdArgs,
};
pub use serve::ServeArgs;

use clap::Parser;

/// Parses the command line and runs it; returns the process exit code. Every failure is one
/// readable paragraph on stderr and exit code 1, never a panic or a backtrace.
pub fn main() -> i32 {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error in qwen-run: {info}. Please report this with the command you ran.");
    }));
    let cli = match Cli::try_parse_from(expand_llama_flags(std::env::args_os())) {
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
    let result = std::panic::catch_unwind(|| match cli.command {
        Some(Command::Run(args)) => run::run(&args),
        Some(Command::Bench(args)) => bench::bench(&args),
        Some(Command::Chat(args)) => chat::chat(&args),
        Some(Command::Serve(args)) => args.server_options().and_then(crate::server::serve),
        Some(Command::Fidelity(args)) => fidelity::fidelity(&args),
        Some(Command::Template(args)) => template::template(&args),
        None => run::run(&cli.run),
    });
    match result {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            1
        }
        Err(_) => 1,
    }
}
