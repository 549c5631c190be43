# Sourced by vagrant/build-image.sh and scripts/container-stage (bash).
# host_sources: apt lines for the bookworm suites of the mirror the host's apt already uses
# (this machine reaches only that archive, so we never name a host ourselves).
host_sources() {
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        awk 'BEGIN { RS = ""; FS = "\n" }
        {
            types = uris = suites = comps = ""
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^[ \t]*#/ || !(n = index($i, ":"))) continue
                k = tolower(substr($i, 1, n - 1)); v = substr($i, n + 1)
                gsub(/^[ \t]+|[ \t]+$/, "", v)
                if (k == "types") types = v; else if (k == "uris") uris = v
                else if (k == "suites") suites = v; else if (k == "components") comps = v
            }
            if (types !~ /(^| )deb( |$)/) next
            nu = split(uris, u, " "); ns = split(suites, s, " ")
            for (a = 1; a <= nu; a++) for (b = 1; b <= ns; b++)
                if (s[b] ~ /^bookworm/) print "deb " u[a] " " s[b] " " comps
        }' /etc/apt/sources.list.d/debian.sources
    else
        grep -hE '^deb[[:space:]]+[^[]*bookworm' /etc/apt/sources.list
    fi
}
