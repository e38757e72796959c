package guest

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// credential resolves an OCI "User" ("uid", "uid:gid", "name",
// "name:group", mixes allowed) against the sealed root's passwd and
// group files. Supplementary groups are the groups listing the user.
func credential(user, passwdPath, groupPath string) (*syscall.Credential, error) {
	name, group, hasGroup := strings.Cut(user, ":")
	cred := &syscall.Credential{}
	pw, _ := readColonFile(passwdPath) // a missing file only matters for names
	username := ""
	if uid, err := strconv.ParseUint(name, 10, 32); err == nil {
		cred.Uid = uint32(uid)
		for _, f := range pw {
			if len(f) >= 4 && f[2] == name {
				username = f[0]
				if gid, err := strconv.ParseUint(f[3], 10, 32); err == nil {
					cred.Gid = uint32(gid)
				}
				break
			}
		}
	} else {
		found := false
		for _, f := range pw {
			if len(f) >= 4 && f[0] == name {
				uid, err1 := strconv.ParseUint(f[2], 10, 32)
				gid, err2 := strconv.ParseUint(f[3], 10, 32)
				if err1 != nil || err2 != nil {
					return nil, fmt.Errorf("user %q: bad entry in %s", name, passwdPath)
				}
				cred.Uid, cred.Gid, username, found = uint32(uid), uint32(gid), name, true
				break
			}
		}
		if !found {
			return nil, fmt.Errorf("user %q not found in the sealed root's %s", name, passwdPath)
		}
	}
	gr, _ := readColonFile(groupPath)
	if hasGroup {
		if gid, err := strconv.ParseUint(group, 10, 32); err == nil {
			cred.Gid = uint32(gid)
		} else {
			found := false
			for _, f := range gr {
				if len(f) >= 3 && f[0] == group {
					gid, err := strconv.ParseUint(f[2], 10, 32)
					if err != nil {
						return nil, fmt.Errorf("group %q: bad entry in %s", group, groupPath)
					}
					cred.Gid, found = uint32(gid), true
					break
				}
			}
			if !found {
				return nil, fmt.Errorf("group %q not found in the sealed root's %s", group, groupPath)
			}
		}
	}
	cred.Groups = []uint32{}
	if username != "" {
		for _, f := range gr {
			if len(f) < 4 {
				continue
			}
			for _, m := range strings.Split(f[3], ",") {
				if m == username {
					if gid, err := strconv.ParseUint(f[2], 10, 32); err == nil && uint32(gid) != cred.Gid {
						cred.Groups = append(cred.Groups, uint32(gid))
					}
				}
			}
		}
	}
	return cred, nil
}

func readColonFile(p string) ([][]string, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out [][]string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		out = append(out, strings.Split(line, ":"))
	}
	return out, sc.Err()
}
