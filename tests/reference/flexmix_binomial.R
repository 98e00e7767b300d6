# Reference fit of a mixture of binomial regressions with a number of trials per row: flexmix's
# FLXMRglm(family = "binomial") on cbind(successes, trials - successes) ~ x, K = 2, best of many
# random starts. The data (tests/reference/binomial_trials.csv, 300 rows) were drawn with numpy
# (seed 2026): x ~ N(0, 1), trials uniform on 1..20, component (0.4, 0.6), logit
# (-1 + 1.5 x, 1 - x). Regenerate (R with flexmix: apt-get install r-cran-flexmix):
#   Rscript tests/reference/flexmix_binomial.R tests/reference/binomial_trials.csv > tests/reference/flexmix_binomial.json
suppressPackageStartupMessages(library(flexmix))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1])
best <- NULL
for (s in 1:40) {
  set.seed(s)
  f <- try(flexmix(cbind(successes, trials - successes) ~ x, data = d, k = 2,
                   model = FLXMRglm(family = "binomial"),
                   control = list(iter.max = 5000, tolerance = 1e-12, minprior = 0)), silent = TRUE)
  if (inherits(f, "try-error") || f@k != 2) next
  if (is.null(best) || logLik(f) > logLik(best)) best <- f
}
par <- parameters(best)
cat(sprintf('{"binomial_trials": {"formula": "cbind(successes, trials - successes) ~ x, k = 2", "loglik": %.9f, "df": %d,\n',
            as.numeric(logLik(best)), attr(logLik(best), "df")))
cat(sprintf('  "coef": [[%.9f, %.9f], [%.9f, %.9f]], "weights": [%.9f, %.9f],\n',
            par[1, 1], par[2, 1], par[1, 2], par[2, 2], best@prior[1], best@prior[2]))
cat(sprintf('  "flexmix": "%s", "R": "%s"}}\n', packageVersion("flexmix"), R.version.string))
