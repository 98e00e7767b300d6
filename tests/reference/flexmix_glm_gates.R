# Reference fits of GLM experts with a concomitant (softmax) gate: flexmix's FLXPmultinom on its own
# NPreg data, best of many random starts. Regenerate (R with flexmix: apt-get install r-cran-flexmix):
#   Rscript tests/reference/flexmix_glm_gates.R ../shared/data/NPreg.csv > tests/reference/flexmix_glm_gates.json
suppressPackageStartupMessages(library(flexmix))
args <- commandArgs(trailingOnly = TRUE)
NPreg <- read.csv(args[1])
best_of <- function(fit_one, starts = 40) {
  best <- NULL
  for (s in seq_len(starts)) {
    set.seed(s)
    f <- try(fit_one(), silent = TRUE)
    if (inherits(f, "try-error")) next
    if (is.null(best) || logLik(f) > logLik(best)) best <- f
  }
  best
}
ctrl <- list(iter.max = 5000, tolerance = 1e-12, minprior = 0)
fit <- best_of(function() flexmix(yp ~ x, data = NPreg, k = 2, control = ctrl,
                                    model = FLXMRglm(family = "poisson"),
                                    concomitant = FLXPmultinom(~ x)))
par <- parameters(fit)
gate <- parameters(fit, which = "concomitant")
cat(sprintf('{"poisson_softmax_gate": {"formula": "yp ~ x, concomitant ~ x, k = 2", "loglik": %.9f, "df": %d,\n',
            as.numeric(logLik(fit)), attr(logLik(fit), "df")))
cat(sprintf('  "coef": [[%.9f, %.9f], [%.9f, %.9f]],\n', par[1, 1], par[2, 1], par[1, 2], par[2, 2]))
cat(sprintf('  "gate": [[%.9f, %.9f], [%.9f, %.9f]],\n', gate[1, 1], gate[2, 1], gate[1, 2], gate[2, 2]))
cat(sprintf('  "flexmix": "%s", "R": "%s"}}\n', packageVersion("flexmix"), R.version.string))
