// Command cnidrive runs one CNI operation on a network configuration through
// libcni, the library containerd and CRI-O call, so that the plugins see what
// a container runtime gives them: the result cache, prevResult on CHECK and
// DEL, the version negotiation and the conversion of results between versions.
//
// Usage:
//
//	cnidrive add|check|del|version CONFIG CONTAINERID NETNS [IFNAME]
//
// CONFIG is a .conflist, or a single network configuration (any other name)
// that is run as a list of one. IFNAME defaults to eth0. The pod arguments are
// those the kubelet passes (K8S_POD_NAMESPACE=default, K8S_POD_NAME and
// K8S_POD_INFRA_CONTAINER_ID = CONTAINERID, IgnoreUnknown=1).
//
// Environment:
//
//	CNI_PATH       directories holding the plugins, ':'-separated
//	CNI_CACHE      libcni's result cache directory (default /var/lib/cni)
//	CNIDRIVE_ARGS  more pod arguments, "K=V;K2=V2", appended to the above
//	CNIDRIVE_CAPS  capability arguments as a JSON object, e.g.
//	               {"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]}
//
// add prints the result as one line of JSON; version prints the first
// plugin's supported CNI versions, space-separated. A failed operation prints
// "VERB: error" on stderr and exits 1; a malformed command line exits 2.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

const usage = "usage: cnidrive add|check|del|version CONFIG CONTAINERID NETNS [IFNAME]"

// operation runs one verb and returns what to print on stdout ("" for nothing).
type operation func(ctx context.Context, cni *libcni.CNIConfig, list *libcni.NetworkConfigList,
	rt *libcni.RuntimeConf) (string, error)

var operations = map[string]operation{
	"add": func(ctx context.Context, cni *libcni.CNIConfig, list *libcni.NetworkConfigList,
		rt *libcni.RuntimeConf) (string, error) {
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			return "", err
		}
		out, err := json.Marshal(result)
		return string(out), err
	},
	"check": func(ctx context.Context, cni *libcni.CNIConfig, list *libcni.NetworkConfigList,
		rt *libcni.RuntimeConf) (string, error) {
		return "", cni.CheckNetworkList(ctx, list, rt)
	},
	"del": func(ctx context.Context, cni *libcni.CNIConfig, list *libcni.NetworkConfigList,
		rt *libcni.RuntimeConf) (string, error) {
		return "", cni.DelNetworkList(ctx, list, rt)
	},
	"version": func(ctx context.Context, cni *libcni.CNIConfig, list *libcni.NetworkConfigList,
		_ *libcni.RuntimeConf) (string, error) {
		info, err := cni.GetVersionInfo(ctx, list.Plugins[0].Network.Type)
		if err != nil {
			return "", err
		}
		return strings.Join(info.SupportedVersions(), " "), nil
	},
}

// loadConfig reads a conflist, or a single configuration wrapped into a list.
func loadConfig(path string) (*libcni.NetworkConfigList, error) {
	if strings.HasSuffix(path, ".conflist") {
		return libcni.ConfListFromFile(path)
	}
	conf, err := libcni.ConfFromFile(path)
	if err != nil {
		return nil, err
	}
	return libcni.ConfListFromConf(conf)
}

// runtimeConf is the sandbox as the runtime describes it, with the extra pod
// and capability arguments from the environment.
func runtimeConf(id, netns, ifname string) (*libcni.RuntimeConf, error) {
	rt := &libcni.RuntimeConf{
		ContainerID: id,
		NetNS:       netns,
		IfName:      ifname,
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", "default"},
			{"K8S_POD_NAME", id},
			{"K8S_POD_INFRA_CONTAINER_ID", id},
		},
	}
	if extra := os.Getenv("CNIDRIVE_ARGS"); extra != "" {
		for _, pair := range strings.Split(extra, ";") {
			key, value, ok := strings.Cut(pair, "=")
			if !ok {
				return nil, fmt.Errorf("CNIDRIVE_ARGS: %q is not K=V", pair)
			}
			rt.Args = append(rt.Args, [2]string{key, value})
		}
	}
	if caps := os.Getenv("CNIDRIVE_CAPS"); caps != "" {
		if err := json.Unmarshal([]byte(caps), &rt.CapabilityArgs); err != nil {
			return nil, fmt.Errorf("CNIDRIVE_CAPS: %w", err)
		}
	}
	return rt, nil
}

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", what, err)
	os.Exit(1)
}

func main() {
	args := os.Args[1:]
	if len(args) < 4 || len(args) > 5 {
		fmt.Fprintln(os.Stderr, usage)
		os.Exit(2)
	}
	verb, path, id, netns := args[0], args[1], args[2], args[3]
	op, known := operations[verb]
	if !known {
		fmt.Fprintf(os.Stderr, "unknown verb %q\n%s\n", verb, usage)
		os.Exit(2)
	}
	ifname := "eth0"
	if len(args) == 5 {
		ifname = args[4]
	}

	list, err := loadConfig(path)
	if err != nil {
		fail("load", err)
	}
	rt, err := runtimeConf(id, netns, ifname)
	if err != nil {
		fail("environment", err)
	}
	// An empty CNI_CACHE leaves libcni at its default, /var/lib/cni.
	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), os.Getenv("CNI_CACHE"), nil)

	out, err := op(context.Background(), cni, list, rt)
	if err != nil {
		fail(strings.ToUpper(verb), err)
	}
	if out != "" {
		fmt.Println(out)
	}
}
