// `kubectl-tapestry`: the same program as `tapestry`, under the name kubectl looks for on the PATH,
// so `kubectl tapestry status` runs it (its help then says `kubectl tapestry`).
include!("../main.rs");
