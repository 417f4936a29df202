use super::BenchArgs;
use crate::bench::{run_constrained, to_csv, to_markdown, BenchOptions};
use anyhow::Result;

pub fn bench(args: &BenchArgs) -> Result<()> {
    let format = args.format.format()?;
    let threads = match &args.model.threads[..] {
        [] => vec![num_cpus::get_physical().max(1)],
        list => list.to_vec(),
    };
    let mut model = args.model.clone();
    model.threads.truncate(1);
    let mut load = model.load_options()?;
    // The time-to-first-token test renders a chat prompt.
    load.chat_template = args.template.template_override()?;
    // Every repetition must do the full work: no prompt-prefix caching.
    load.cache_ram_mib = 0;
    load.prompt_cache = None;
    let report = run_constrained(
        &BenchOptions {
            load,
            prompt_lens: args.n_prompt.clone(),
            gen_lens: args.n_gen.clone(),
            depths: args.n_depth.clone(),
            threads,
            parallel: args.parallel.clone(),
            repetitions: args.repetitions,
        },
        format.as_ref(),
    )?;
    let text = match args.output.as_str() {
        "json" => serde_json::to_string_pretty(&report)? + "\n",
        "csv" => to_csv(&report),
        _ => to_markdown(&report),
    };
    print!("{text}");
    Ok(())
}
