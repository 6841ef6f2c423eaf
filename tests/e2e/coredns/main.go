// A minimal CoreDNS for the e2e node (scripts/build-e2e.sh): upstream's coredns.go main with only
// the plugins a cluster DNS needs instead of core/plugin's every one. The order the plugins run
// in is not the import order: it is core/dnsserver's zdirectives.go (dnsserver.Directives), which
// names every plugin; the ones not linked in are skipped.
package main

import (
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"

	"github.com/coredns/coredns/coremain"
)

func main() {
	coremain.Run()
}
