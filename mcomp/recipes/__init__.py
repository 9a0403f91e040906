"""Named presets: recipe TOML files shipped with the package (`mcomp optimize --preset NAME`)."""
