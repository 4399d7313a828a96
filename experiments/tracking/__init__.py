"""The Sacred side of every experiment: this package (and `experiments.reproduce`) is the only code that imports
Sacred.

- `experiment`: an experiment with the house observers and its full source record (`make_experiment`).
- `config`: the config scopes every experiment shares and the bridge from a run's config to our dataclasses.
- `errors`: a library's user-facing error as Sacred's one-line failure.
- `recorder`: the epoch loop's records as Sacred metrics, run info and artifacts.
- `runs`: what a search or a training does around its task: resume, the epoch loop, results.
- `corpus`: the RNN experiments' corpus, its tokenizer and out-of-vocabulary shares recorded with the run.
- `folders`: reading a run folder's JSON files (the report and `reproduce` alike).
- `observers`: where a run is recorded: its folder and, for a team, MongoDB (`mongo`) or SQL (`sql`) databases,
  one run id in all; `database`: database runs read back as run folders.

Runs go to runs/<id> (env DARTS_RUNS_DIR or `-F DIR` moves it); env DARTS_MONGO_URL / DARTS_SQL_URL or the flags
`-m URL` / `-s URL` record them in a database too (`observers`).
"""
import warnings

# Before any submodule imports sacred: sacred 0.8.7 imports pkg_resources, which warns on every start.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
